"""sheepdog: run a Python function over many arguments as a Grid Engine array job.

>>> import sheepdog
>>> sheepdog.map(lambda a, b: a + b, [(1, 1), (1, 2), (2, 2)], {"host": "headnode"})
[2, 3, 4]
"""

import logging

from . import serialisation
from ._api import cancel, get_errors, get_output, get_results, map, map_async
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
)
from .executor import Executor
from .server import Server, get_server
from .storage import Storage

__version__ = "0.3.0"

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
    "__version__",
    "cancel",
    "get_errors",
    "get_output",
    "get_results",
    "get_server",
    "map",
    "map_async",
    "serialisation",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
