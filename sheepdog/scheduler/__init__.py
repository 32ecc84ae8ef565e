"""Batch schedulers: one small class each, chosen by the ``scheduler`` config key.

``gridengine`` (:class:`GridEngine`) and ``slurm`` (:class:`Slurm`) submit over
SSH to a head node; ``local`` (:class:`LocalScheduler`) runs the array tasks as
processes on this machine; ``auto`` (the default) asks the head node which of
``qsub`` and ``sbatch`` it offers (Grid Engine where both answer). All implement
:class:`Scheduler` (in :mod:`.base`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..errors import ConfigError
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
from .slurm import Slurm

if TYPE_CHECKING:
    from ..config import Config
    from .base import Host

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
    "Slurm",
    "State",
    "Waiting",
    "detect_scheduler",
    "open_remote",
    "open_scheduler",
    "scheduler_class",
]

logger = logging.getLogger(__name__)

#: Each ``scheduler`` config value and its class (``"auto"`` is one of the cluster ones).
SCHEDULERS: dict[str, type[Scheduler]] = {
    "gridengine": GridEngine, "slurm": Slurm, "local": LocalScheduler,
}
#: What ``auto`` looks for on the head node, in order of preference: the first that answers.
_DETECT_ORDER: tuple[tuple[str, type[Scheduler]], ...] = (("qsub", GridEngine), ("sbatch", Slurm))
#: One shell command that prints which of the submit commands are on PATH, after the login
#: set-up both schedulers need; it always exits 0 when it ran.
DETECT_COMMAND = (
    GridEngine.preamble + Slurm.preamble
    + "for c in " + " ".join(c for c, _ in _DETECT_ORDER)
    + '; do command -v "$c" >/dev/null 2>&1 && echo "$c"; done; true'
)

#: What ``auto`` found, per head node and login (host, port, user, ssh_config): asked once.
_detected: dict[tuple[str, int, str, str | None], str] = {}
_detected_lock = threading.Lock()


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


def detect_scheduler(config: Config, host: Host) -> type[Scheduler]:
    """For ``scheduler="auto"``: which scheduler the head node offers, asked once per login.

    Runs :data:`DETECT_COMMAND` non-interactively over ``host``; Grid Engine where both
    ``qsub`` and ``sbatch`` answer. A failed command raises (nothing is cached); a head
    node with neither is a ConfigError that says what to do.
    """
    key = (config.host, config.ssh_port, config.ssh_user, config.ssh_config)
    with _detected_lock:
        name = _detected.get(key)
    if name is None:
        result = host.run(DETECT_COMMAND, timeout_s=60)
        found = result.stdout.split()
        match = next((cls for command, cls in _DETECT_ORDER if command in found), None)
        if match is None:
            raise ConfigError(
                f"config key 'scheduler': 'auto' found neither qsub nor sbatch on "
                f"{config.host} (a non-interactive SSH login's PATH, after /etc/profile); "
                "set scheduler to 'gridengine' or 'slurm', and make its commands found in "
                "a non-interactive login (e.g. in ~/.bashrc)",
                key="scheduler",
            )
        with _detected_lock:
            if key not in _detected:
                _detected[key] = match.name
                logger.info(
                    "scheduler 'auto': %s offers %s, so sheepdog uses %s", config.host,
                    " and ".join(found), match.label,
                )
            name = _detected[key]
    return SCHEDULERS[name]


def open_scheduler(config: Config) -> Scheduler:
    """The config's scheduler, with its host (an SSH connection, opened on use).

    For ``auto`` the connection opens now, to ask the head node (once per login).
    """
    if config.scheduler == "local":
        host = LocalHost()
        return LocalScheduler(host, host.absolute(config.ssh_dir))
    if config.scheduler != "auto":
        chosen = SCHEDULERS[config.scheduler]
        return chosen(open_remote(config, chosen))
    remote = open_remote(config, Scheduler)
    try:
        chosen = detect_scheduler(config, remote)
        config.check_raw_options(chosen)
    except BaseException:
        remote.close()
        raise
    remote.preamble = getattr(chosen, "preamble", "")
    return chosen(remote)
