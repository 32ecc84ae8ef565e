"""sheepdog: run a Python function over many arguments as a Grid Engine array job.

>>> import sheepdog
>>> sheepdog.map(lambda a, b: a + b, [(1, 1), (1, 2), (2, 2)], {"host": "headnode"})
[2, 3, 4]
"""

import logging

from . import serialisation
from ._version import __version__, __version_info__
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
from .config import Config, default_config
from .deployment import Deployer
from .doctor import doctor
from .errors import (
    ConfigError,
    DeploymentError,
    HostKeyError,
    JobError,
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
from .server import Server, get_server
from .session import Session
from .store import Storage

__all__ = [
    "Config",
    "ConfigError",
    "Deployer",
    "DeploymentError",
    "Executor",
    "HostKeyError",
    "JobError",
    "RemoteCommandError",
    "RemoteError",
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
    "doctor",
    "get_errors",
    "get_output",
    "get_results",
    "get_server",
    "is_finished",
    "map",
    "map_async",
    "map_sync",
    "rerun",
    "serialisation",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
