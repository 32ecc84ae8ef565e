"""Batch schedulers: one small class each, chosen by the ``scheduler`` config key.

``gridengine`` (:class:`GridEngine`) and ``slurm`` (:class:`Slurm`) submit over
SSH to a head node; ``local`` (:class:`LocalScheduler`) runs the array tasks as
processes on this machine; ``auto`` (the default) asks the head node which of
``qsub`` and ``sbatch`` it offers (Grid Engine where both answer). All implement
:class:`Scheduler` (in :mod:`.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..remote import Remote
from .auto import AutoScheduler, detect_scheduler
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
from .slurm import Slurm

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "ArrayLimits",
    "AutoScheduler",
    "Deletion",
    "GridEngine",
    "JobStatus",
    "LocalHost",
    "LocalScheduler",
    "Scheduler",
    "Slurm",
    "State",
    "Waiting",
    "detect_scheduler",
    "open_remote",
    "open_scheduler",
    "scheduler_class",
]

#: Each ``scheduler`` config value and its class (``"auto"`` is one of the cluster ones).
SCHEDULERS: dict[str, type[Scheduler]] = {
    "gridengine": GridEngine, "slurm": Slurm, "local": LocalScheduler,
}
def scheduler_class(name: str) -> type[Scheduler]:
    """The class for a ``scheduler`` config value; ``auto`` gives the base class's defaults."""
    return SCHEDULERS.get(name, Scheduler)


def open_remote(config: Config, scheduler: type[Scheduler] = GridEngine) -> Remote:
    """An SSH connection (not yet open) to the config's head node, set up for ``scheduler``."""
    return Remote(
        config.host,
        config.ssh_port,
        config.ssh_user,
        config.ssh_keyfile,
        known_hosts=config.known_hosts,
        ssh_config=config.ssh_config,
        timeout_s=config.ssh_timeout_s,
        preamble=getattr(scheduler, "preamble", ""),
    )


def open_scheduler(config: Config) -> Scheduler:
    """The config's scheduler, with its host (an SSH connection, opened on use).

    For ``auto``, an :class:`~sheepdog.scheduler.auto.AutoScheduler`, which asks the head
    node on first use (once per login) and then acts as the scheduler it found.
    """
    if config.scheduler == "local":
        host = LocalHost()
        return LocalScheduler(host, host.absolute(config.ssh_dir))
    if config.scheduler == "auto":
        return AutoScheduler(config, open_remote(config, Scheduler))
    chosen = SCHEDULERS[config.scheduler]
    return chosen(open_remote(config, chosen))
