"""Batch schedulers: one small class each, chosen by the ``scheduler`` config key.

``gridengine`` (:class:`GridEngine`) submits over SSH to a Grid Engine head
node; ``local`` (:class:`LocalScheduler`) runs the array tasks as processes on
this machine. Both implement :class:`Scheduler` (in :mod:`.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..remote import Remote
from .base import (
    SCHEDULER_NAMES,
    ArrayLimits,
    Deletion,
    JobStatus,
    Scheduler,
    State,
    Waiting,
)
from .gridengine import GridEngine
from .local import LocalHost, LocalScheduler

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "ArrayLimits",
    "Deletion",
    "GridEngine",
    "JobStatus",
    "LocalHost",
    "LocalScheduler",
    "Scheduler",
    "State",
    "Waiting",
    "open_remote",
    "open_scheduler",
    "scheduler_class",
]

#: Each ``scheduler`` config value and its class.
SCHEDULERS: dict[str, type[Scheduler]] = {"gridengine": GridEngine, "local": LocalScheduler}


def scheduler_class(name: str) -> type[Scheduler]:
    """The class for a ``scheduler`` config value (validated by :class:`~sheepdog.Config`)."""
    return SCHEDULERS[name]


def open_remote(config: Config) -> Remote:
    """An SSH connection (not yet open) to the config's head node, set up for its scheduler."""
    return Remote(
        config.host,
        config.ssh_port,
        config.ssh_user,
        config.ssh_keyfile,
        known_hosts=config.known_hosts,
        ssh_config=config.ssh_config,
        timeout_s=config.ssh_timeout_s,
        preamble=GridEngine.preamble,
    )


def open_scheduler(config: Config) -> Scheduler:
    """The config's scheduler, with its host (for Grid Engine, an SSH connection opened on use)."""
    if config.scheduler == "local":
        host = LocalHost()
        return LocalScheduler(host, host.absolute(config.ssh_dir))
    return GridEngine(open_remote(config))
