"""The configuration of a sheepdog request: where to submit, how to reach back, what to ask for.

A config is a frozen :class:`Config`. Every function that takes a config also
accepts the original Sheepdog 0.2 dict (``{"host": "fear", "ge_opts": [...]}``)
or the path of a JSON file holding one, such as the ``.cluster/cluster.json``
that ``ci/cluster up`` writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import json
import math
import os
import re
import socket
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .connect import ConnectMode
from .directives import LINE_BREAKS, check_prologue_line, check_raw_option, check_shell
from .errors import ConfigError
from .store.db import DEFAULT_DBFILE

if TYPE_CHECKING:
    from .scheduler.base import Scheduler

__all__ = ["DEFAULT_GE_OPTS", "Config", "as_config", "default_config"]

ConfigLike = Union["Config", Mapping[str, Any], str, "os.PathLike[str]"]

_KW_ONLY: dict[str, bool] = {"kw_only": True} if sys.version_info >= (3, 10) else {}

_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]%-]+$")
_LISTEN = re.compile(r"^[A-Za-z0-9_.:%-]+$")
_H_RT = re.compile(r"^(\d+|\d+:\d{1,2}:\d{1,2})$")


#: 0.2.3's default ``ge_opts``: run in ``~/.sheepdog`` and write the output files there,
#: which is what sheepdog does when ``ge_opts`` is unset (in ``ssh_dir``, on the qsub
#: command line). ``default_config`` shows it; given back as ``ge_opts``, it counts as unset.
DEFAULT_GE_OPTS = ("-wd $HOME/.sheepdog/", "-o $HOME/.sheepdog/", "-e $HOME/.sheepdog/")

#: The values of the ``scheduler`` key: ``"auto"`` asks the head node which it runs.
SCHEDULER_NAMES = ("auto", "gridengine", "slurm", "local")
#: The values of the ``connect`` key: how workers reach the server (docs/connecting.rst).
CONNECT_MODES = tuple(mode.value for mode in ConnectMode)
#: The values of the ``ssh_client`` key: which SSH client reaches the head node (docs/mfa.rst).
SSH_CLIENTS = ("paramiko", "openssh", "auto")


def _default_user() -> str:
    """your user name on this machine"""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getuser raises several types when no name is known
        return "nobody"


def _default_localhost() -> str:
    """this machine's fully qualified domain name"""
    return socket.getfqdn()


@dataclasses.dataclass(frozen=True, **_KW_ONLY)
class Config:
    """Where and how to run a request; build it with keywords or from the original dict.

    The first block of fields are the original Sheepdog 0.2 keys, with the
    original defaults except ``shell`` (now ``/usr/bin/python3``). The rest
    are sheepdog's additions.
    """

    # --- the original's keys -------------------------------------------------
    #: The head node to SSH into, where ``qsub`` or ``sbatch`` runs. Example:
    #: ``"fear"``. Not needed with ``scheduler="local"``.
    host: str = ""
    #: The SSH port. Example: ``2222``.
    ssh_port: int = 22
    #: The user to log in as.
    ssh_user: str = dataclasses.field(default_factory=_default_user)
    #: A private key file; otherwise the ssh-agent and ``~/.ssh/id_*`` are tried.
    ssh_keyfile: str | None = None
    #: Remote directory for job files, their key files (the request secrets) and
    #: Grid Engine's output files; relative to the home directory. Made mode 0700.
    #: The execution nodes must see it at the same path (a shared file system):
    #: the workers read their key file there.
    ssh_dir: str = ".sheepdog"
    #: The SQLite file holding requests and results.
    dbfile: str = DEFAULT_DBFILE
    #: The local server's port; ``None`` picks a free one.
    port: int | None = None
    #: The name by which execution nodes reach this machine. Example:
    #: ``"host.docker.internal"`` for the Docker cluster.
    localhost: str = dataclasses.field(default_factory=_default_localhost)
    #: The address of this machine the server listens on. ``None``: the address
    #: that ``localhost`` resolves to here, so the server listens where the
    #: workers reach it and nowhere else. Set it when ``localhost`` does not
    #: resolve here, or resolves to the wrong interface, e.g. the Docker host's
    #: gateway address (``172.17.0.1``) for the Docker cluster, whose
    #: ``host.docker.internal`` only resolves inside the containers.
    #: ``"0.0.0.0"`` listens on every interface; only when you ask for it. A
    #: server restarted on the same port (``sheepdog serve``, or
    #: ``Server(port, None, dbfile)``) listens where the first one did.
    listen_address: str | None = None
    #: The workers' Python: the job file's ``#!`` line and ``qsub -S``. The
    #: original's default was ``/usr/bin/python``.
    shell: str = "/usr/bin/python3"
    #: A list of raw qsub options, one ``#$`` line each, for example
    #: ``["-l h_vmem=2G", "-r y"]``: the Grid Engine name of ``scheduler_opts``
    #: (set one of them, not both). sheepdog passes ``-wd``, ``-o`` and ``-e``
    #: for ``ssh_dir`` on the qsub command line (the original's defaults),
    #: each unless these options set it. ``-t`` and ``-S`` are set by sheepdog
    #: and refused here.
    #: ``-l mem_grab=2G`` (or ``h_vmem``) also limits the worker's address space
    #: with ``setrlimit``, so the task gets a ``MemoryError``.
    ge_opts: tuple[str, ...] | None = None

    # --- the scheduler -------------------------------------------------------
    #: Where the array tasks run: ``"gridengine"`` submits them with qsub on
    #: ``host``, ``"slurm"`` with sbatch; ``"auto"`` asks ``host`` which of
    #: qsub and sbatch it offers (Grid Engine where both answer), once per
    #: login; ``"local"`` runs them as processes on this machine (the same
    #: job file, worker and server), to try a map before sending it to the
    #: cluster. ``host`` is not needed for ``"local"``; see :doc:`getting-started`
    #: and :doc:`schedulers`.
    scheduler: str = "auto"
    #: Raw options for the scheduler, one directive line each (``#$`` for Grid
    #: Engine, ``#SBATCH`` for Slurm), for example ``["--qos=long"]``. Grid
    #: Engine also takes them as ``ge_opts``. sheepdog runs the jobs in
    #: ``ssh_dir`` and writes their output files there (qsub ``-wd -o -e``,
    #: sbatch ``--chdir --output --error``), each unless these options set
    #: it. Options sheepdog sets itself are
    #: refused: ``-t``, ``-S`` (Grid Engine); ``--array``/``-a``,
    #: ``--job-name``/``-J``, ``--parsable`` (Slurm).
    scheduler_opts: tuple[str, ...] | None = None

    # --- SSH -----------------------------------------------------------------
    #: The known_hosts file the head node's key is checked against (default:
    #: ``~/.ssh/known_hosts``). Unknown keys are refused.
    known_hosts: str | None = None
    #: The OpenSSH config file to read for HostName, User, Port, IdentityFile,
    #: ProxyCommand and ProxyJump (default: ``~/.ssh/config``).
    ssh_config: str | None = None
    #: Bound on connecting and authenticating, in seconds.
    ssh_timeout_s: float = 30.0
    #: The SSH client: ``"paramiko"`` (built in), ``"openssh"`` (the system's ``ssh``,
    #: through one master connection shared by every sheepdog process, so a second
    #: factor is typed once; see :doc:`mfa`), or ``"auto"``: OpenSSH when your ssh
    #: config sets ControlMaster or ControlPath for the host, or the host asks for a
    #: code (keyboard-interactive); else paramiko.
    ssh_client: str = "auto"
    #: How long the OpenSSH master connection stays open after its last use
    #: (``ControlPersist``), in seconds: a code is asked at most once in that time.
    ssh_persist_s: float = 4 * 3600.0
    #: How the workers reach this machine's server (:doc:`connecting`):
    #: ``"direct"`` at ``localhost``:``port``; ``"tunnel"`` through sheepdog's
    #: own SSH connection and a relay on the head node; ``"auto"`` tries
    #: whether the head node can reach the server and picks one, and moves to
    #: the tunnel when array tasks run but none calls in.
    connect: str = "auto"
    #: The head node's address on which the tunnel's relay listens and the
    #: execution nodes reach it. ``None``: the first address other than
    #: loopback that the head node's own name resolves to there (every
    #: interface only if there is none, with a warning). Example: ``"10.1.0.5"``.
    relay_address: str | None = None
    #: Connections the tunnel's relay holds at once for each array task that
    #: calls through it (at least 16 in all); more are closed at once, as are
    #: connections idle for 120 s. Example: ``8``.
    relay_connections_per_task: int = 4

    # --- the array job -------------------------------------------------------
    #: Number of array tasks; ``None`` picks ``min(tasks, 100)`` (one per core
    #: for ``scheduler="local"``). Each leases tasks
    #: until none is left, so fewer workers than tasks still do all of them. More
    #: than the cluster's ``max_aj_tasks`` or ``max_aj_instances`` are submitted
    #: as several array jobs.
    workers: int | None = None
    #: Tasks handed to an array task per lease; ``None`` picks
    #: ``tasks // (4 * workers)``, between 1 and 64.
    batch: int | None = None
    #: An array task exits after this many tasks; ``1`` with ``workers=N`` gives
    #: the original's one task per array task (a fresh process each).
    tasks_per_worker: int | None = None
    #: At most this many array tasks of a job run at once: Grid Engine's
    #: ``-tc``, Slurm's ``--array=1-N%max_running``.
    max_running: int | None = None
    #: Memory per array task in GB, requested as ``-l <mem_resource>=<mem_gb>G``
    #: (Grid Engine) or ``--mem=<mem_gb>G`` (Slurm).
    mem_gb: float | None = None
    #: The Grid Engine memory resource your site uses: ``h_vmem``, ``mem_free``,
    #: ``m_mem_free``... (Slurm has one: ``--mem``).
    mem_resource: str = "h_vmem"
    #: Hard run time limit, seconds or ``H:MM:SS``, requested as ``-l h_rt=...``
    #: (Grid Engine) or ``--time=H:MM:SS`` (Slurm, which rounds up to a minute).
    #: A worker stops leasing when the time left is shorter than its longest task,
    #: and the open work goes to fresh jobs.
    h_rt: str | None = None
    #: The queue, requested as ``-q <queue>`` (Grid Engine) or
    #: ``--partition=<queue>`` (Slurm).
    queue: str | None = None
    #: Parallel environment and slots, ``(name, slots)``, requested as
    #: ``-pe <name> <slots>`` (Grid Engine) or ``--cpus-per-task=<slots>``
    #: (Slurm, which has no parallel environments: the name is not used).
    pe: tuple[str, int] | None = None

    # --- the worker's environment -------------------------------------------
    #: Shell lines run by ``/bin/sh`` on the worker before Python starts
    #: (``module load``, ``source venv/bin/activate``); see :doc:`executor`.
    prologue: tuple[str, ...] | None = None
    #: Bytes of each task's stdout and of its stderr kept with its result
    #: (``sheepdog logs``, :func:`sheepdog.get_output`).
    capture_bytes: int = 65536

    # --- lifecycle -----------------------------------------------------------
    #: Per-task time limit in seconds, enforced on the worker; the task's error
    #: says it timed out after that many seconds.
    task_timeout_s: float | None = None
    #: Overall bound on a blocking ``map`` or ``get_results``, in seconds.
    timeout_s: float | None = None
    #: How often work whose worker vanished (killed, node lost, job gone) is
    #: handed out or resubmitted again before it becomes an error.
    retries: int = 2
    #: Seconds a leased task stays with a worker that stopped sending heartbeats.
    lease_s: float = 60.0
    #: How long a worker keeps trying to reach the server before it gives up. It then
    #: writes the results it finished to the request's spool beside the job file and
    #: exits; sheepdog collects them when it is back (a laptop that slept; see
    #: :doc:`failures`). Longer than a lid closed over lunch costs only a slot held.
    worker_retry_s: float = 600.0
    #: Ctrl-C during a blocking ``map`` cancels its jobs, unless this is true.
    keep_jobs_on_interrupt: bool = False
    #: The largest result, pickled, that a worker may upload to the server, in
    #: bytes; a larger one gets a 413 naming this key. ``None``: 1 TiB. It is
    #: the server's setting, read when the server starts. Example: ``10**10``.
    max_blob_bytes: int | None = None
    #: Serve HTTPS with a self-signed certificate that the job files pin; see
    #: :doc:`security`.
    tls: bool = False

    # --- serialisation -------------------------------------------------------
    #: ``"bytecode"`` (the workers run your Python minor version) or
    #: ``"source"``, which ships the function's source, for workers on another
    #: Python version.
    mode: str = "bytecode"

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Config:
        """Build a config from the original's dict; unknown keys are an error naming valid ones."""
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"config must be a dict or a Config, not {type(mapping).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in mapping if k not in valid)
        if unknown:
            # A typo is the usual cause: name the key meant before listing all of them.
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, valid, n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            # The keys on lines of their own, folded: the message fits a terminal.
            keys = textwrap.fill(", ".join(sorted(valid)), 78, initial_indent="  ",
                                 subsequent_indent="  ", break_on_hyphens=False)
            raise ConfigError(
                f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                f"the valid keys are:\n{keys}",
                key=unknown[0],
            )
        values = dict(mapping)
        for key in ("ge_opts", "scheduler_opts"):
            if key in values and isinstance(values[key], list):
                values[key] = tuple(values[key])
        if values.get("ge_opts") == DEFAULT_GE_OPTS:
            values["ge_opts"] = None  # 0.2.3's default, from default_config: the same as unset
        if "prologue" in values and isinstance(values["prologue"], list):
            values["prologue"] = tuple(values["prologue"])
        if "pe" in values and isinstance(values["pe"], list):
            values["pe"] = tuple(values["pe"])
        if isinstance(values.get("dbfile"), os.PathLike):
            values["dbfile"] = os.fspath(values["dbfile"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Read a JSON config file, such as the one ``ci/cluster up`` writes."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_mapping(data)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some keys changed (validated like the original)."""
        return self.from_mapping({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """The config as a JSON-friendly dict with every key."""
        out = dataclasses.asdict(self)
        for key in ("ge_opts", "scheduler_opts", "pe", "prologue"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @property
    def raw_options_key(self) -> str:
        """The key that holds the raw scheduler options: ``ge_opts`` or ``scheduler_opts``."""
        return "ge_opts" if self.ge_opts is not None else "scheduler_opts"

    @property
    def raw_options(self) -> tuple[str, ...] | None:
        """The raw scheduler options (``scheduler_opts``, or its Grid Engine alias ``ge_opts``)."""
        return self.ge_opts if self.ge_opts is not None else self.scheduler_opts

    def job_options(self, scheduler: type[Scheduler]) -> list[str]:
        """The raw options, then what the typed resources stand for: ``scheduler``'s lines."""
        return list(self.raw_options or ()) + scheduler.resource_options(self)


def as_config(config: ConfigLike) -> Config:
    """Turn a Config, the original's dict or a JSON file path into a validated Config."""
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_mapping(config)
    if isinstance(config, (str, os.PathLike)):
        return Config.from_file(config)
    raise ConfigError(
        f"config must be a dict, a sheepdog.Config or a JSON file path, not {type(config).__name__}"
    )


# --- validation ---------------------------------------------------------------


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: {message}", key=key)


def _check_type(key: str, value: object, types: tuple[type, ...], what: str) -> None:
    # bool is an int subclass, but True is never a sensible port or count.
    if isinstance(value, bool) and bool not in types:
        raise _fail(key, f"must be {what}, not a bool ({value!r})")
    if not isinstance(value, types):
        raise _fail(key, f"must be {what}, not {type(value).__name__} ({value!r})")


def _check_text(key: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check_type(key, value, (str,), "a string")
    assert isinstance(value, str)
    if LINE_BREAKS.search(value):
        raise _fail(key, f"must not contain line breaks or NUL characters ({value!r})")


def _check_number(
    key: str, value: object, *, minimum: float, optional: bool = False, integer: bool = False
) -> None:
    if value is None and optional:
        return
    if integer:
        _check_type(key, value, (int,), "an integer")
    else:
        _check_type(key, value, (int, float), "a number")
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < minimum:
        raise _fail(key, f"must be at least {minimum}, got {value!r}")


def _validate(c: Config) -> None:
    if c.scheduler not in SCHEDULER_NAMES:
        raise _fail(
            "scheduler",
            f"must be one of {', '.join(repr(n) for n in SCHEDULER_NAMES)}, got {c.scheduler!r}",
        )
    if c.host == "" and c.scheduler != "local":  # a local run SSHes nowhere
        raise _fail("host", "is required: the head node (Grid Engine or Slurm) to SSH into")
    _check_text("host", c.host)
    if c.host and (not _HOST.match(c.host) or c.host.startswith("-")):
        raise _fail("host", f"is not a valid host name or address: {c.host!r}")
    _check_number("ssh_port", c.ssh_port, minimum=1, integer=True)
    if c.ssh_port > 65535:
        raise _fail("ssh_port", f"must be at most 65535, got {c.ssh_port}")
    _check_text("ssh_user", c.ssh_user)
    if not c.ssh_user or c.ssh_user.startswith("-") or re.search(r"\s", c.ssh_user):
        raise _fail("ssh_user", f"is not a valid user name: {c.ssh_user!r}")
    for key in ("ssh_keyfile", "known_hosts", "ssh_config"):
        _check_text(key, getattr(c, key), optional=True)
    _check_text("ssh_dir", c.ssh_dir)
    if not c.ssh_dir.strip():
        raise _fail("ssh_dir", "must not be empty")
    if re.search(r"\$[A-Za-z_{]", c.ssh_dir):
        # Not a shell risk (it is always quoted) but Grid Engine expands $USER, $HOME,
        # $JOB_ID... in the -wd/-o/-e paths, so the job would look in another directory.
        raise _fail("ssh_dir", f"must not contain $NAME (Grid Engine expands it): {c.ssh_dir!r}")
    _check_text("dbfile", c.dbfile)
    _check_number("port", c.port, minimum=0, optional=True, integer=True)
    if c.port is not None and c.port > 65535:
        raise _fail("port", f"must be at most 65535, got {c.port}")
    if c.connect not in CONNECT_MODES:
        raise _fail(
            "connect",
            f"must be one of {', '.join(repr(m) for m in CONNECT_MODES)}, got {c.connect!r}; "
            "see docs/connecting.rst",
        )
    _check_text("relay_address", c.relay_address, optional=True)
    if c.relay_address is not None and (
        not _LISTEN.match(c.relay_address) or c.relay_address.startswith("-")
    ):
        raise _fail("relay_address", f"must be an IPv4 address of the head node, or a host "
                                     f"name that resolves to one there, got {c.relay_address!r}")
    _check_number("relay_connections_per_task", c.relay_connections_per_task, minimum=1,
                  integer=True)
    _check_number("max_blob_bytes", c.max_blob_bytes, minimum=1, optional=True, integer=True)
    _check_text("localhost", c.localhost)
    if not _HOST.match(c.localhost):
        raise _fail("localhost", f"is not a valid host name or address: {c.localhost!r}")
    _check_text("listen_address", c.listen_address, optional=True)
    if c.listen_address is not None and not _LISTEN.match(c.listen_address):
        raise _fail(
            "listen_address",
            f"must be an IP address of this machine (or 0.0.0.0 for every interface), or a "
            f"host name that resolves to one, got {c.listen_address!r}",
        )
    # What goes into the job file is checked here by the job file's own rules.
    check_shell("shell", c.shell)
    if c.ge_opts is not None and c.scheduler_opts is not None:
        raise _fail(
            "scheduler_opts",
            "and 'ge_opts' are both set, but ge_opts is only scheduler_opts' Grid Engine name; "
            "put every raw option in one of them (scheduler_opts)",
        )
    for key in ("ge_opts", "scheduler_opts"):
        opts = getattr(c, key)
        if opts is None:
            continue
        if isinstance(opts, str) or not isinstance(opts, Sequence):
            raise _fail(key, f"must be a list of strings, not {type(opts).__name__}")
        # What every scheduler needs; what one refuses (the options sheepdog sets for its
        # jobs) is its own rule, checked when it is opened (sheepdog.scheduler.check_options).
        for i, opt in enumerate(opts):
            check_raw_option(key, i, opt)
    _check_number("ssh_timeout_s", c.ssh_timeout_s, minimum=0.1)
    if c.ssh_client not in SSH_CLIENTS:
        raise _fail(
            "ssh_client",
            f"must be one of {', '.join(repr(m) for m in SSH_CLIENTS)}, got {c.ssh_client!r}; "
            "see docs/mfa.rst",
        )
    _check_number("ssh_persist_s", c.ssh_persist_s, minimum=1)
    _check_number("workers", c.workers, minimum=1, optional=True, integer=True)
    _check_number("batch", c.batch, minimum=1, optional=True, integer=True)
    _check_number("max_running", c.max_running, minimum=1, optional=True, integer=True)
    _check_number("tasks_per_worker", c.tasks_per_worker, minimum=1, optional=True, integer=True)
    _check_number("mem_gb", c.mem_gb, minimum=0.001, optional=True)
    _check_text("mem_resource", c.mem_resource)
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", c.mem_resource):
        raise _fail("mem_resource", f"is not a resource name: {c.mem_resource!r}")
    _check_text("h_rt", c.h_rt, optional=True)
    if c.h_rt is not None and not _H_RT.match(c.h_rt):
        raise _fail("h_rt", f"must be seconds or H:MM:SS, got {c.h_rt!r}")
    _check_text("queue", c.queue, optional=True)
    if c.queue is not None and not re.match(r"^[A-Za-z0-9_.@*,-]+$", c.queue):
        raise _fail("queue", f"is not a queue name: {c.queue!r}")
    if c.pe is not None:
        if (
            not isinstance(c.pe, tuple)
            or len(c.pe) != 2
            or not isinstance(c.pe[0], str)
            or not re.match(r"^[A-Za-z0-9_.-]+$", c.pe[0])
            or isinstance(c.pe[1], bool)
            or not isinstance(c.pe[1], int)
            or c.pe[1] < 1
        ):
            raise _fail("pe", f"must be (name, slots), e.g. ('smp', 4), got {c.pe!r}")
    if c.prologue is not None:
        if isinstance(c.prologue, str) or not isinstance(c.prologue, Sequence):
            what = type(c.prologue).__name__
            raise _fail("prologue", f"must be a list of shell lines, not {what}")
        for i, line in enumerate(c.prologue):
            check_prologue_line(i, line)
    _check_number("capture_bytes", c.capture_bytes, minimum=0, integer=True)
    _check_number("task_timeout_s", c.task_timeout_s, minimum=0.001, optional=True)
    _check_number("timeout_s", c.timeout_s, minimum=0.001, optional=True)
    _check_number("retries", c.retries, minimum=0, integer=True)
    _check_number("lease_s", c.lease_s, minimum=1)
    _check_number("worker_retry_s", c.worker_retry_s, minimum=1)
    _check_type("keep_jobs_on_interrupt", c.keep_jobs_on_interrupt, (bool,), "True or False")
    _check_type("tls", c.tls, (bool,), "True or False")
    if c.mode not in ("bytecode", "source"):
        raise _fail("mode", f"must be 'bytecode' or 'source', got {c.mode!r}")


#: Sheepdog 0.2's name: every config key with its default (``host`` has none: it is required).
#: A copy, built from :class:`Config` when first read; changing it changes nothing.
default_config: dict[str, Any]  # made by _lazy_attributes: it asks the system for two values
_default_config: dict[str, Any] | None = None


def _lazy_attributes(module: str) -> Callable[[str], Any]:
    """A module's ``__getattr__`` (PEP 562) that gives :data:`default_config`, made once.

    ``ssh_user`` and ``localhost`` ask the system (the login name; this machine's
    FQDN, perhaps from DNS) for their defaults, and importing sheepdog asks nothing.
    """

    def attribute(name: str) -> Any:
        global _default_config
        if name != "default_config":
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if _default_config is None:
            defaults = Config(host="headnode").as_dict()
            del defaults["host"]
            defaults["ge_opts"] = list(DEFAULT_GE_OPTS)
            _default_config = defaults
        return _default_config

    return attribute


if not TYPE_CHECKING:  # mypy would take every unknown name of the module for an attribute
    __getattr__ = _lazy_attributes(__name__)
    #: The package root's, which only imports (``sheepdog.default_config``).
    _root_getattr = _lazy_attributes("sheepdog")
