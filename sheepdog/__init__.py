"""sheepdog: run a Python function over many arguments as a Grid Engine array job.

>>> import sheepdog
>>> sheepdog.map(lambda a, b: a + b, [(1, 1), (1, 2), (2, 2)], {"host": "headnode"})
[2, 3, 4]
"""

import logging

from . import serialisation
from ._version import __version__
from .api import cancel, get_errors, get_output, get_results, map, map_async, rerun
from .attach import attach
from .config import Config
from .deployment import Deployer
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
from .store import Storage

#: The name Sheepdog 0.2's quickstart still used for :func:`map`.
map_sync = map
#: ``(0, 3, 0)``, as Sheepdog 0.2 had it.
__version_info__ = tuple(int(part) for part in __version__.split("."))

#: Sheepdog 0.2's name: every config key with its default (``host`` has none: it is required).
#: A copy, built from :class:`Config`; changing it changes nothing.
default_config = {
    key: value for key, value in Config(host="headnode").as_dict().items() if key != "host"
}

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
    "get_errors",
    "get_output",
    "get_results",
    "get_server",
    "map",
    "map_async",
    "map_sync",
    "rerun",
    "serialisation",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
