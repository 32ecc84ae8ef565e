"""Batch schedulers: one small class each, chosen by the ``scheduler`` config key.

``gridengine`` (:class:`GridEngine`) and ``slurm`` (:class:`Slurm`) submit over
SSH to a head node; ``local`` (:class:`LocalScheduler`) runs the array tasks as
processes on this machine; ``auto`` (the default) asks the head node which of
``qsub`` and ``sbatch`` it offers (Grid Engine where both answer). All implement
:class:`Scheduler` (in :mod:`.base`).
"""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING, Any

from ..config import SCHEDULER_NAMES
from ..errors import SheepdogError
from ..remote import Remote
from .auto import AutoScheduler, detect_scheduler
from .base import (
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

logger = logging.getLogger(__name__)

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
    "check_options",
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


def check_options(config: Config) -> None:
    """Raise ConfigError if the config's raw options break its scheduler's rules.

    :class:`~sheepdog.config.Config` checks what every scheduler needs; which options
    one refuses is its own rule (:meth:`Scheduler.check_raw_options`), checked here when
    it is opened. Under ``auto`` the head node's answer decides, on first use; until
    then ``ge_opts``, Grid Engine's options, are checked by its rules.
    """
    if config.scheduler != "auto":
        SCHEDULERS[config.scheduler].check_raw_options(config)
    elif config.ge_opts is not None:
        GridEngine.check_raw_options(config)


def open_remote(config: Config, scheduler: type[Scheduler] = GridEngine) -> Remote:
    """An SSH connection (not yet open) to the config's head node, set up for ``scheduler``.

    ``ssh_client`` picks the client: paramiko, OpenSSH through a master connection
    (:mod:`sheepdog.openssh`), or ``auto``: OpenSSH when the user's ssh config asks for a
    master for the host (said in one log line), else paramiko, which hands over to OpenSSH
    when the host asks for a second factor.
    """
    from ..openssh import OpenSSHRemote, config_wants_master, ssh_settings, takes_over

    args = (config.host, config.ssh_port, config.ssh_user, config.ssh_keyfile)
    options: dict[str, Any] = {
        "known_hosts": config.known_hosts, "ssh_config": config.ssh_config,
        "timeout_s": config.ssh_timeout_s, "preamble": getattr(scheduler, "preamble", ""),
    }
    if config.ssh_client == "paramiko":
        return Remote(*args, **options)
    if config.ssh_client == "openssh":
        return OpenSSHRemote(*args, **options, persist_s=config.ssh_persist_s)
    settings = _ssh_settings_or_none(config, ssh_settings)
    why = config_wants_master(settings) if settings is not None else None
    if settings is not None and why is not None:
        logger.info("ssh_client=auto chose openssh: %s", why)
        return OpenSSHRemote(*args, **options, persist_s=config.ssh_persist_s,
                             settings=settings)
    return Remote(*args, **options, on_code=takes_over(config.ssh_persist_s))


def _ssh_settings_or_none(config: Config, ssh_settings: Any) -> dict[str, list[str]] | None:
    """``ssh -G`` for the config's host; None where there is no ssh program (paramiko only)."""
    if shutil.which("ssh") is None:
        return None
    try:
        settings: dict[str, list[str]] = ssh_settings(config.host, ssh_config=config.ssh_config)
    except SheepdogError as exc:
        logger.info("ssh_client=auto: could not read the ssh config (%s)", exc)
        return None
    return settings


def open_scheduler(config: Config) -> Scheduler:
    """The config's scheduler, with its host (an SSH connection, opened on use).

    For ``auto``, an :class:`~sheepdog.scheduler.auto.AutoScheduler`, which asks the head
    node on first use (once per login) and then acts as the scheduler it found. Raw
    options the scheduler refuses raise ConfigError first (:func:`check_options`).
    """
    check_options(config)
    if config.scheduler == "local":
        host = LocalHost()
        return LocalScheduler(host, host.absolute(config.ssh_dir))
    if config.scheduler == "auto":
        return AutoScheduler(config, open_remote(config, Scheduler))
    chosen = SCHEDULERS[config.scheduler]
    return chosen(open_remote(config, chosen))
