"""sheepdog: run a Python function over many arguments as a Grid Engine or Slurm array job.

>>> import sheepdog
>>> sheepdog.map(lambda a, b: a + b, [(1, 1), (1, 2), (2, 2)], {"host": "headnode"})
[2, 3, 4]
"""

import logging
import typing

# platforms comes first: on a Python without fork and fcntl (Windows' own) importing it
# says at once to use WSL2, instead of failing deep inside the first map.
from . import deployment, platforms, serialisation, server, storage  # noqa: F401
from .api import (
    cancel,
    get_errors,
    get_output,
    get_results,
    is_finished,
    map,
    map_async,
    map_sync,
    rerun,
)
from .attach import attach
from .config import Config
from .dashboard.status import RequestStatus, status
from .deployment import Deployer
from .doctor import doctor
from .errors import (
    ConfigError,
    DeploymentError,
    HostKeyError,
    JobError,
    PlatformError,
    RemoteCommandError,
    RemoteError,
    SerialisationError,
    ServerError,
    SheepdogError,
    SSHError,
    StorageError,
    SubmitError,
    TaskFailedError,
    TimeoutError,
    UnknownRequestError,
    UnknownTaskError,
)
from .executor import Executor

# 0.2.3's ``from sheepdog import job_file`` gave the function, not its module (which
# stays importable as ``sheepdog.job_file`` for ``from sheepdog.job_file import ...``).
from .job_file import job_file  # noqa: E402,I001 - after the module import, which it shadows
from .server import Server, get_server
from .session import Session
from .store import Storage
from .version import __version__, __version_info__

if typing.TYPE_CHECKING:
    from .config import default_config
else:
    # default_config is made when first read: it asks for the login name and this machine's
    # FQDN, and importing sheepdog asks nothing (sheepdog.config's _lazy_attributes).
    from .config import _root_getattr as __getattr__  # noqa: F401 - PEP 562, sheepdog.x

__all__ = [
    "Config",
    "ConfigError",
    "Deployer",
    "DeploymentError",
    "Executor",
    "HostKeyError",
    "JobError",
    "PlatformError",
    "RemoteCommandError",
    "RemoteError",
    "RequestStatus",
    "SSHError",
    "SerialisationError",
    "Server",
    "ServerError",
    "Session",
    "SheepdogError",
    "Storage",
    "StorageError",
    "SubmitError",
    "TaskFailedError",
    "TimeoutError",
    "UnknownRequestError",
    "UnknownTaskError",
    "__version__",
    "__version_info__",
    "attach",
    "cancel",
    "default_config",
    "deployment",
    "doctor",
    "get_errors",
    "get_output",
    "get_results",
    "get_server",
    "is_finished",
    "job_file",
    "map",
    "map_async",
    "map_sync",
    "rerun",
    "serialisation",
    "server",
    "status",
    "storage",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
