"""Check, before a first map, that sheepdog can work with a cluster: ``sheepdog doctor``.

:func:`doctor` goes through what a map needs, in order, and says for each what it
found and, where it is a problem, what to do (docs/cli.rst):

1. **SSH login**: which user, host, port and keys, and the host key it accepted;
   which client (``ssh_client``), its master connection and how long that has left,
   and whether the host asks for a second factor;
2. **scheduler**: that a non-interactive login finds ``qsub`` or ``sbatch``, and
   which one ``scheduler="auto"`` uses;
3. **shell**: that the config's ``shell`` is an executable file (on the head node, or
   here for ``scheduler="local"``, which then skips the login and the tunnel);
4. **probe job**: a one-task array job, with the config's options and prologue,
   which runs the workers' Python and from an execution node tries
5. **worker Python** against this one (the stub needs 3.6+; ``mode="bytecode"`` the
   same minor version);
6. **direct**: the server's address (``localhost``:port), and
7. **tunnel**: the relay on the head node (:mod:`sheepdog.tunnel`), and
8. **connect**: which way ``connect`` (``auto`` asks the head node as a map would)
   will get the workers to you, and whether that way works;
9. **modules** (with ``check``): whether each module imports on the node, and its
   version there against here.

The probe job calls a server of its own, on a throwaway database: the config's
database is not touched. A problem that stops maps is a *blocker*; the command
exits 1 when there is one.
"""

from __future__ import annotations

import logging
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from . import tunnel
from .config import Config, ConfigLike, as_config
from .connect import ConnectMode
from .doctor_probe import ProbeJob, probe_job_file
from .doctor_report import COLUMNS as COLUMNS  # re-exported: api.py folds its notes to it
from .doctor_report import FAIL, OK, SKIPPED, WARN, Check, Report
from .doctor_report import render_check as render_check  # re-exported: cli.py, the tests
from .environment import compare, payload_modules
from .errors import ConfigError, SheepdogError
from .net import host_port
from .openssh import OpenSSHRemote, openssh_of, takes_over
from .remote import Login, Remote
from .scheduler import Scheduler, check_options, open_remote, open_scheduler
from .scheduler.auto import offered
from .scheduler.gridengine import GridEngine
from .scheduler.local import LocalHost, LocalScheduler
from .serialisation import serialise_function
from .server import Server, registry
from .server_for import server_for
from .worker_address import worker_address

__all__ = ["DEFAULT_TIMEOUT_S", "Check", "Report", "doctor", "probe_job_file"]

logger = logging.getLogger(__name__)

#: How long the probe job may take, queue wait included, unless told otherwise.
DEFAULT_TIMEOUT_S = 300.0
#: The oldest Python the worker stub runs on.
OLDEST_WORKER_PYTHON = (3, 6)


def asks_for_code(config: Config, remote: Remote) -> str:
    """Whether the host asks for a second factor after the key, as a clause.

    Known when ssh_client="auto" moved to OpenSSH for that reason; otherwise paramiko
    logs in with the key to see what the host asks next (no code is typed).
    """
    if not isinstance(remote, OpenSSHRemote):
        return "the host asks for a second factor (keyboard-interactive) after the key"
    probe = open_remote(config.replace(ssh_client="auto"), Scheduler)
    if isinstance(probe, OpenSSHRemote):  # the ssh config asks for a master: ask paramiko
        probe = Remote(config.host, config.ssh_port, config.ssh_user, config.ssh_keyfile,
                       known_hosts=config.known_hosts, ssh_config=config.ssh_config,
                       timeout_s=config.ssh_timeout_s,
                       on_code=takes_over(config.ssh_persist_s))
    try:
        moved = probe.openssh() is not None
    except SheepdogError as exc:
        return f"could not tell whether the host asks for a second factor ({exc})"
    finally:
        probe.close()
    if moved:
        return "the host asks for a second factor (keyboard-interactive) after the key"
    return "the host asks for no second factor after the key"


def doctor(
    config: ConfigLike,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_check: Callable[[Check], None] | None = None,
    check: Sequence[str] | Callable[..., Any] | None = None,
) -> Report:
    """Check that maps with ``config`` can work, and say what to fix; see the module's doc.

    ``timeout_s`` bounds the wait for the probe job (queue wait included);
    ``on_check`` is called with each check as soon as it is made (the CLI prints it).
    ``check`` names modules (or is a function: the modules its payload names) whose
    import and version on the node the probe job compares with this machine's: one
    ``module NAME`` check each, FAIL when it does not import there, warn when the
    versions differ.
    """
    cfg = as_config(config)
    check_options(cfg)  # raw options the scheduler refuses: before logging in
    modules = check_modules_of(check)
    run = _Doctor(cfg, timeout_s, on_check or (lambda check: None))
    run.modules = modules
    try:
        run.go()
    finally:
        run.close()
    return run.report


def check_modules_of(check: Sequence[str] | Callable[..., Any] | None) -> list[str]:
    """The module names ``doctor(check=...)`` asks about: given, or a function's."""
    if check is None:
        return []
    if callable(check):
        return payload_modules(serialise_function(check))
    if isinstance(check, str):
        check = check.split(",")
    names = [name.strip() for name in check if name.strip()]
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"{name!r} is not a module name (check takes names like "
                              "'numpy' or 'scipy.linalg', separated by commas)", key="check")
    return names


class _Doctor(ProbeJob):
    """One run of :func:`doctor`: the connection, the throwaway server, the checks so far."""

    def __init__(self, config: Config, timeout_s: float, on_check: Callable[[Check], None]):
        self.config = config
        self.timeout_s = timeout_s
        self.on_check = on_check
        self.report = Report(config.host or "localhost")
        self.scheduler: Scheduler | None = None
        self.server: Server | None = None
        self.tmpdir: str | None = None
        self.modules: list[str] = []

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.report.checks.append(check)
        self.on_check(check)
        return check

    def skip(self, *names: str, why: str) -> None:
        for name in names:
            self.add(name, SKIPPED, why)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()  # closes the SSH connection: the relay sees EOF and exits
        if self.tmpdir is not None:
            registry.stop(f"{self.tmpdir}/doctor.sqlite")
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # --- the checks, in order --------------------------------------------------------

    def go(self) -> None:
        cfg = self.config
        later = ("probe job", "worker Python", *(f"module {m}" for m in self.modules),
                 "direct", "tunnel", "connect")
        if cfg.scheduler == "local":
            self.go_local()
            return
        # Without a scheduler's set-up: offered() runs both schedulers' own.
        remote = open_remote(cfg, Scheduler)
        try:
            login = self.check_login(remote)
            if login is None:
                self.skip("scheduler", *later, why="needs the SSH login")
                return
            kind = self.check_scheduler(remote, login.user)
            if kind is not None:
                self.check_shell(remote)
        finally:
            remote.close()
        if kind is None:
            self.skip(*later, why="needs qsub or sbatch")
            return
        self.scheduler = open_scheduler(cfg if cfg.scheduler != "auto"
                                        else cfg.replace(scheduler=kind.name))
        try:
            self.server = self.start_server()
        except SheepdogError as exc:
            self.add("probe job", FAIL, f"could not start a server here: {exc}",
                     "fix the config key the message names")
            self.skip(*later[1:], why="needs a server")
            return
        relay, relay_error = self.start_tunnel()
        found = self.run_probe_job(kind, relay)
        if found is None:
            self.skip(*later[1:], why="needs the probe job's answer")
            return
        self.check_python(found)
        self.check_modules(found)
        self.check_connect(found, relay, relay_error)

    def go_local(self) -> None:
        """scheduler='local': the shell, then the probe job, run as a process here."""
        self.add("scheduler", OK, "scheduler='local': the array tasks run as processes on "
                 "this machine and connect to it directly")
        modules = [f"module {m}" for m in self.modules]
        if not self.check_shell(LocalHost()):
            self.skip("probe job", "worker Python", *modules, "direct", why="needs the shell")
            return
        self.scheduler = open_scheduler(self.config)
        try:
            self.server = self.start_server()
        except SheepdogError as exc:
            self.add("probe job", FAIL, f"could not start a server here: {exc}",
                     "fix the config key the message names")
            self.skip("worker Python", *modules, "direct", why="needs a server")
            return
        found = self.run_probe_job(LocalScheduler, None)
        if found is None:
            self.skip("worker Python", *modules, "direct", why="needs the probe job's answer")
            return
        self.check_python(found)
        self.check_modules(found)
        reach = (found.get("reach") or {}).get("direct", {})
        self.add("direct", OK if reach.get("ok") else FAIL,
                 f"this machine: {reach.get('said', 'not tried')}",
                 "" if reach.get("ok") else "set localhost to an address of this machine")

    def check_shell(self, host: LocalHost | Remote) -> bool:
        """Whether the config's ``shell`` is an executable file (on the head node: a warning)."""
        shell = self.config.shell
        local = isinstance(host, LocalHost)
        try:
            found = host.run(f"test -f {shlex.quote(shell)} && test -x {shlex.quote(shell)}",
                             check=False, timeout_s=60).exit_status == 0
        except SheepdogError as exc:
            self.add("shell", WARN, f"could not look for shell {shell}: {exc}")
            return True
        where = "this machine" if local else f"the head node {self.config.host}"
        if found:
            self.add("shell", OK, f"{shell} is an executable file on {where}")
            return True
        self.add("shell", FAIL if local else WARN,
                 f"shell is {shell}, which is not an executable file on {where}"
                 + ("" if local else " (the execution nodes may differ: see the probe job)"),
                 "set shell to the path of the workers' Python (`command -v python3` "
                 "prints one)")
        return not local

    def check_login(self, remote: Remote) -> Login | None:
        try:
            login = remote.login()
        except SheepdogError as exc:
            self.add("SSH login", FAIL, str(exc), "see the SSH page of the docs")
            return None
        keys = ", ".join(login.keys) or "the ssh-agent and ~/.ssh/id_*"
        self.add("SSH login", OK,
                 f"{login.user}@{login.host}:{login.port} with {keys}; host key "
                 f"{login.host_key} (checked against {login.known_hosts}); "
                 f"{self.client_said(remote)}")
        return login

    def client_said(self, remote: Remote) -> str:
        """Which SSH client logged in, its master connection and time left, and whether
        the host asks for a second factor."""
        openssh = openssh_of(remote)
        chosen = f"ssh_client={self.config.ssh_client!r}"
        if openssh is None:
            return (f"client paramiko ({chosen}); the host asked for no second factor "
                    "after the key")
        master = openssh.master()
        state = "not open"
        if master.running:
            left = "" if master.left_s is None else \
                f", closes after {master.left_s / 3600:.1f} h unused"
            state = f"open{left}"
        return (f"client openssh ({chosen}), master connection {master.path} ({state}); "
                f"{asks_for_code(self.config, remote)}")

    def check_scheduler(self, remote: Remote, user: str) -> type[Scheduler] | None:
        cfg = self.config
        try:
            found = offered(remote)
        except SheepdogError as exc:
            self.add("scheduler", FAIL, f"could not look for qsub and sbatch: {exc}")
            return None
        names = " and ".join(f"{command} ({cls.label})" for command, cls in found)
        where = f"a non-interactive login on {cfg.host}"
        path_fix = ("make the command found without a terminal: `ssh HOST 'command -v qsub'` "
                    "must print its path (set PATH or source the scheduler's settings in "
                    "~/.bashrc, above any line that returns early for non-interactive shells)")
        if not found:
            self.add("scheduler", FAIL, f"{where} finds neither qsub nor sbatch", path_fix)
            return None
        kind: type[Scheduler] | None
        if cfg.scheduler == "auto":
            kind = found[0][1]
            detail = f"{where} finds {names}; scheduler='auto' uses {kind.label}"
        else:
            kind = next((cls for _, cls in found if cls.name == cfg.scheduler), None)
            if kind is None:
                self.add("scheduler", FAIL,
                         f"scheduler={cfg.scheduler!r}, but {where} finds only {names}",
                         f"set scheduler to 'auto' or '{found[0][1].name}', or {path_fix}")
                return None
            detail = f"{where} finds {names}; the config names {kind.label}"
        if kind is GridEngine and user == "root":
            self.add("scheduler", FAIL, f"{detail}, but you log in as root, and Grid Engine "
                     "refuses jobs from root", "log in as your own user (ssh_user)")
            return None
        self.add("scheduler", OK, detail)
        return kind

    def start_server(self) -> Server:
        """A server on a throwaway database, where the config's server would listen."""
        self.tmpdir = tempfile.mkdtemp(prefix="sheepdog-doctor-")
        # Plain HTTP: whether the nodes reach the address does not depend on TLS.
        probe_cfg = self.config.replace(dbfile=f"{self.tmpdir}/doctor.sqlite", tls=False)
        try:
            return server_for(probe_cfg)
        except SheepdogError:
            if probe_cfg.port is None:
                raise
            # The config's fixed port is taken (a map is running?): any port tells as much.
            return server_for(probe_cfg.replace(port=None))

    def start_tunnel(self) -> tuple[tuple[str, int] | None, str]:
        """The relay's address on the head node, or None and why it did not start."""
        assert self.scheduler is not None and self.server is not None
        try:
            return worker_address(self.config, self.scheduler, self.server,
                                  ConnectMode.TUNNEL), ""
        except SheepdogError as exc:
            return None, str(exc)

    def check_python(self, found: dict[str, Any]) -> None:
        cfg = self.config
        version = tuple(found.get("version") or (0, 0, 0))
        theirs = (f"{found.get('implementation')} {found.get('python')} at "
                  f"{found.get('executable')} on {found.get('node')}")
        ours = f"{platform.python_implementation().lower()} {platform.python_version()}"
        detail = f"{theirs}; this machine runs {ours}"
        how = ("set the config's shell to a newer Python on the workers, or load one in "
               "prologue (e.g. 'module load python')")
        if version[:2] < OLDEST_WORKER_PYTHON:
            self.add("worker Python", FAIL, f"{detail}: the worker stub needs Python 3.6 or "
                     "newer", how)
            return
        same = (found.get("implementation") == sys.implementation.name
                and list(version[:2]) == list(sys.version_info[:2]))
        if same:
            self.add("worker Python", OK, detail)
        elif cfg.mode == "bytecode":
            self.add("worker Python", FAIL, f"{detail}: functions go as bytecode (mode="
                     "'bytecode'), which loads only on the same Python minor version",
                     f"set mode='source', or make shell (or prologue) run Python "
                     f"{sys.version_info[0]}.{sys.version_info[1]} on the workers")
        else:
            self.add("worker Python", OK, f"{detail}; functions go as source (mode='source'), "
                     "so the versions may differ")

    def check_modules(self, found: dict[str, Any]) -> None:
        """One check per asked-for module: FAIL if it does not import on the node, warn
        if its version there is not the one here."""
        node = found.get("node") or "the node"
        there = found.get("modules") or {}
        for c in compare({name: there.get(name, [False, "not reported"])
                          for name in self.modules}):
            want = f"=={c.here[1]}" if c.here[0] and c.here[1] else ""
            install = (f"install {c.name}{want} for the workers' Python ({self.config.shell}"
                       " -m pip install --user), or load it in the config's prologue")
            if c.status == "missing":
                self.add(f"module {c.name}", FAIL, c.describe(node), install)
            elif c.status == "warn":
                self.add(f"module {c.name}", WARN, c.describe(node) + ": results may differ",
                         install)
            else:
                self.add(f"module {c.name}", OK, c.describe(node))

    def check_connect(
        self, found: dict[str, Any], relay: tuple[str, int] | None, relay_error: str
    ) -> None:
        cfg = self.config
        assert self.server is not None and self.scheduler is not None
        reach = found.get("reach") or {}
        connect = ConnectMode(cfg.connect)
        node = found.get("node") or "the execution node"
        direct = bool(reach.get("direct", {}).get("ok"))
        tunneled = bool(reach.get("tunnel", {}).get("ok"))
        self.add("direct", OK if direct else (FAIL if connect is ConnectMode.DIRECT else WARN),
                 f"{node}: {reach.get('direct', {}).get('said', 'not tried')}",
                 "" if direct else "use connect='tunnel' (or 'auto') from here"
                 if connect is ConnectMode.DIRECT else "")
        if relay is None:
            self.add("tunnel", FAIL if connect is ConnectMode.TUNNEL else WARN,
                     f"the relay did not start: {relay_error}")
        else:
            missing = FAIL if connect is ConnectMode.TUNNEL else WARN
            self.add("tunnel", OK if tunneled else missing,
                     f"{node}, through the relay on {relay[0]}:{relay[1]}: "
                     f"{reach.get('tunnel', {}).get('said', 'not tried')}",
                     "" if tunneled else "the execution nodes must reach the head node on "
                     "the relay's port (a firewall between them?); else use connect='direct' "
                     "from a machine they reach")
        if connect is ConnectMode.AUTO:
            port, head = self.server.port, self.scheduler.host
            assert port is not None and isinstance(head, Remote)
            where = host_port(cfg.localhost, port)
            probe = tunnel.probe_from_head(head, cfg.localhost, port)
            mode, why = tunnel.auto_choice(probe, cfg.host, where)
            if mode == ConnectMode.TUNNEL:
                self.add("connect", OK if tunneled else FAIL, f"'auto' picks {why}",
                         "" if tunneled else "see the tunnel check above")
            elif direct:
                self.add("connect", OK, f"'auto' picks {why}")
            elif tunneled:
                self.add("connect", WARN, f"'auto' picks {why}; the execution nodes do not "
                         "reach you directly, so each map waits 30 s before it moves to the "
                         "tunnel", "set connect='tunnel' to start with it")
            else:
                self.add("connect", FAIL, f"'auto' picks {why}; but the execution nodes "
                         "reach you neither directly nor through the tunnel",
                         "see the direct and tunnel checks above")
        else:
            works = direct if connect is ConnectMode.DIRECT else tunneled
            other = "tunnel" if connect is ConnectMode.DIRECT else "direct"
            other_works = tunneled if connect is ConnectMode.DIRECT else direct
            self.add("connect", OK if works else FAIL,
                     f"connect={cfg.connect!r}: the workers {'reach' if works else 'cannot reach'}"
                     " you that way",
                     "" if works else f"set connect='{other}', which works here" if other_works
                     else "see the direct and tunnel checks above")
