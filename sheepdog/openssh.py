"""SSH to the head node with the system's OpenSSH, through one master connection.

:class:`OpenSSHRemote` does what :class:`~sheepdog.remote.Remote` does (commands, files,
the tunnel's forward and relay) with the ``ssh`` binary. Every call goes through one
master connection (``ControlMaster=auto``) whose socket lives in a 0700 directory of
ours, unless the user's ssh config names a ``ControlPath``; it stays open for
``ssh_persist_s`` after its last use (``ControlPersist``), and every sheepdog process of
the user shares it: a second factor is typed once per persist window (docs/mfa.rst).

A process that cannot prompt (no terminal on stdin, no ``SSH_ASKPASS`` with
``SSH_ASKPASS_REQUIRE``) runs ssh in ``BatchMode``: it never waits on a prompt. When its
master has lapsed it says once "log in again with `sheepdog login CONFIG`" and each
later call fails at once with that message, until a login opens the master again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import FileTooLargeError, NotARegularFileError, RemoteCommandError, SSHError
from .openssh_tunnel import OpenSSHTunnel
from .remote import (
    KEEPALIVE_S,
    CommandResult,
    Login,
    Remote,
    changed_host_key,
    has_terminal,
    known_hosts_entry,
    unknown_host_key,
)

__all__ = [
    "LOGIN_HINT",
    "Master",
    "OpenSSHRemote",
    "can_prompt",
    "config_wants_master",
    "control_dir",
    "openssh_of",
    "remove_stale_socket",
    "ssh_settings",
    "takes_over",
]

logger = logging.getLogger(__name__)

#: What a process that cannot prompt says when the master it needs is not open.
LOGIN_HINT = "log in again with `sheepdog login CONFIG`"
#: Bound on a control command (``ssh -O check|forward|cancel|exit``) and on ``ssh -G``.
CONTROL_TIMEOUT_S = 30.0
#: Bound on a login: the person types a code (or approves a push) within it.
LOGIN_TIMEOUT_S = 300.0
#: ssh exits with this status when ssh itself failed (not the remote command).
SSH_FAILED = 255
#: Exit status of our file commands when the file or directory is not there.
_MISSING = 3
#: The exit status of a bounded read of a path that is not a regular file.
_NOT_REGULAR = 4

#: Control paths whose lapse was already reported by this process (said once each).
_reported: set[str] = set()
_reported_lock = threading.Lock()


def control_dir() -> Path:
    """Our directory for master sockets: made 0700, refused if someone else can enter it.

    Under ``$XDG_RUNTIME_DIR`` when set, else the temporary directory: a socket path
    must be short (108 bytes on Linux).
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"sheepdog-ssh-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not path.is_dir():
        raise SSHError(
            f"{path} is not a private directory of yours (mode {info.st_mode & 0o777:o}, "
            f"owner {info.st_uid}); remove it, and sheepdog makes it again with mode 0700",
            host="",
        )
    return path


def can_prompt() -> bool:
    """Whether an ssh started here may ask for a code: a terminal on stdin, or an askpass
    program the user asked ssh to use (``SSH_ASKPASS`` with ``SSH_ASKPASS_REQUIRE``)."""
    if os.environ.get("SSH_ASKPASS") and os.environ.get("SSH_ASKPASS_REQUIRE") in (
        "force", "prefer",
    ):
        return True
    return has_terminal()


def ssh_settings(
    host: str, *, ssh_config: str | None = None, port: int | None = None,
    user: str | None = None,
) -> dict[str, list[str]]:
    """What ``ssh -G`` says OpenSSH would use for ``host``: each option (lower case) and
    its values, with Match blocks, Include and defaults applied."""
    args = ["ssh", "-G"]
    if ssh_config:
        args += ["-F", os.path.expanduser(ssh_config)]
    if port is not None:
        args += ["-p", str(port)]
    if user:
        args += ["-l", user]
    try:
        done = subprocess.run(
            [*args, "--", host], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=CONTROL_TIMEOUT_S, check=False,
        )
    except FileNotFoundError as exc:
        raise SSHError(
            "ssh_client='openssh' needs the ssh program on PATH; install OpenSSH's client "
            "or set ssh_client='paramiko'", host=host,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SSHError(f"`ssh -G {host}` did not answer within {CONTROL_TIMEOUT_S:g} s",
                       host=host) from exc
    if done.returncode != 0:
        raise SSHError(
            f"`ssh -G {host}` failed: {done.stderr.decode('utf-8', 'replace').strip()}; "
            "check your ssh config", host=host,
        )
    settings: dict[str, list[str]] = {}
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key:
            settings.setdefault(key.lower(), []).append(value)
    return settings


def config_wants_master(settings: dict[str, list[str]]) -> str | None:
    """Why the user's ssh config asks for a master connection (ControlMaster or
    ControlPath set for the host), or None when it does not."""
    master = settings.get("controlmaster", ["false"])[0]
    if master not in ("false", "no"):
        return f"your ssh config sets ControlMaster {master} for the host"
    path = settings.get("controlpath", ["none"])[0]
    if path != "none":
        return f"your ssh config sets ControlPath {path} for the host"
    return None


def openssh_of(remote: Remote) -> OpenSSHRemote | None:
    """The OpenSSH remote doing ``remote``'s work (itself, or the one ``ssh_client="auto"``
    moved to), or None while paramiko does it."""
    found = remote.openssh()
    return found if isinstance(found, OpenSSHRemote) else None


def takes_over(persist_s: float) -> Callable[[Remote], Remote]:
    """For ``ssh_client="auto"``: what makes the OpenSSH remote that takes a paramiko
    Remote's work over when its host asks for a code."""

    def make(remote: Remote) -> Remote:
        return OpenSSHRemote(
            remote.host, remote.port, remote.user, remote.keyfile,
            known_hosts=remote.known_hosts, ssh_config=remote.ssh_config_path,
            timeout_s=remote.timeout_s, preamble=remote.preamble, persist_s=persist_s,
        )

    return make


@dataclass(frozen=True)
class Master:
    """The master connection's state: its socket, whether it runs, and for how long yet."""

    path: str
    running: bool
    #: Seconds until it closes if nothing uses it (None: not known, or not running).
    left_s: float | None
    detail: str


class OpenSSHRemote(OpenSSHTunnel, Remote):
    """A :class:`~sheepdog.remote.Remote` that runs the system's ``ssh`` through a master.

    ``persist_s`` is ``ControlPersist``: how long the master stays open after its last use.
    :meth:`close` leaves the master open for the next process; :meth:`logout` closes it.
    """

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str | None = None,
        keyfile: str | None = None,
        *,
        known_hosts: str | None = None,
        ssh_config: str | None = None,
        timeout_s: float = 30.0,
        preamble: str = "",
        persist_s: float,
        settings: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(host, port, user, keyfile, known_hosts=known_hosts,
                         ssh_config=ssh_config, timeout_s=timeout_s, preamble=preamble)
        self.persist_s = persist_s
        self._settings = settings
        self._master_known = False
        #: A login through an askpass program that failed here is not tried again by this
        #: object (it would give the refused code again); a new Remote tries again.
        self._refused: SSHError | None = None
        self._relays: list[subprocess.Popen[bytes]] = []

    # --- the master ----------------------------------------------------------------

    def settings(self) -> dict[str, list[str]]:
        """``ssh -G`` for the host (asked once)."""
        if self._settings is None:
            self._settings = ssh_settings(self.host, ssh_config=self.ssh_config_path)
        return self._settings

    @property
    def user_control_path(self) -> bool:
        """Whether the user's ssh config names the master's socket (then we use theirs)."""
        return self.settings().get("controlpath", ["none"])[0] != "none"

    def _key(self) -> str:
        # A master is shared only by configs that log in the same way: another known_hosts,
        # key or ssh config gets a master of its own (and its own host key check).
        params = self._resolve()
        login = [params["user"], params["hostname"], str(params["port"]),
                 self.known_hosts or "", self.keyfile or "", self.ssh_config_path or ""]
        return hashlib.sha256("\0".join(login).encode("utf-8")).hexdigest()[:20]

    @property
    def control_path(self) -> str:
        """The master's socket: the user's ControlPath, else one in our 0700 directory."""
        if self.user_control_path:
            return self.settings()["controlpath"][0]
        return str(control_dir() / self._key())

    def _stamp(self) -> Path:
        # Touched at every use: ControlPersist counts from the last one.
        return control_dir() / f"{self._key()}.used"

    def _base(self, *, batch: bool = True) -> list[str]:
        params = self._resolve()
        args = ["ssh"]
        if self.ssh_config_path:
            args += ["-F", os.path.expanduser(self.ssh_config_path)]
        args += ["-p", str(params["port"]), "-l", str(params["user"])]
        if self.keyfile:
            args += ["-i", os.path.expanduser(self.keyfile)]
        options = {
            # Never accept an unknown key: that is how a man in the middle gets our job files.
            "StrictHostKeyChecking": "yes",
            "ControlMaster": "auto",
            "ControlPersist": str(max(1, int(self.persist_s))),
            "ServerAliveInterval": str(KEEPALIVE_S),
            "ConnectTimeout": str(max(1, int(self.timeout_s))),
            "BatchMode": "yes" if batch else "no",
        }
        if self.known_hosts:
            options["UserKnownHostsFile"] = os.path.expanduser(self.known_hosts)
        if not self.user_control_path:
            options["ControlPath"] = self.control_path
        for key, value in options.items():
            args += ["-o", f"{key}={value}"]
        return args

    def master(self) -> Master:
        """Whether the master runs (``ssh -O check``) and how long it has left."""
        path = self.control_path
        done = self._control("check")
        said = done.stderr.decode("utf-8", "replace").strip()
        if done.returncode != 0:
            return Master(path, False, None, said or "no master")
        left: float | None = None
        try:
            left = max(0.0, self.persist_s - (time.time() - self._stamp().stat().st_mtime))
        except OSError:
            pass
        return Master(path, True, left, said)

    def _control(
        self, command: str, extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                [*self._base(), "-O", command, *extra, "--", self.host],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=CONTROL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SSHError(f"`ssh -O {command}` for {self.host} did not answer within "
                           f"{CONTROL_TIMEOUT_S:g} s", host=self.host) from exc

    def login_master(self, *, interactive: bool | None = None) -> Master:
        """Open the master if it is not open (asking for a code where one can be typed)."""
        state = self.master()
        if state.running:
            with _reported_lock:
                _reported.discard(self.control_path)
            self._touch()
            self._master_known = True
            return state
        prompt = can_prompt() if interactive is None else interactive
        if self._refused is not None:
            raise self._refused
        remove_stale_socket(self.control_path)
        args = self._base(batch=not prompt)
        if prompt and not has_terminal():
            # An askpass program gives the same answer if asked again.
            args += ["-o", "NumberOfPasswordPrompts=1"]
        with tempfile.TemporaryFile() as err:
            # -f: into the background once logged in; its output goes to a file, as a
            # pipe would be held open by the master for hours.
            try:
                done = subprocess.run(
                    [*args, "-M", "-N", "-f", "--", self.host],
                    stdin=None if prompt else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, timeout=LOGIN_TIMEOUT_S, check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise SSHError(f"the SSH login to {self.host} did not finish within "
                               f"{LOGIN_TIMEOUT_S:g} s", host=self.host) from exc
            err.seek(0)
            said = err.read().decode("utf-8", "replace").strip()
        if done.returncode != 0:
            error = self._login_error(said, prompt)
            if prompt and not has_terminal():
                # An askpass program would give the refused answer again; a person at a
                # terminal gets asked again at the next call.
                self._refused = error
            raise error
        state = self.master()
        if not state.running:
            # ssh logged in but runs without a master (a socket it could not make): every
            # later call would find none, and ask for a code again.
            raise SSHError(
                f"the SSH login to {self.target} succeeded, but its master connection did not "
                f"start at {self.control_path} ({said[-300:] or state.detail}); check that "
                "directory, or the ControlPath of your ssh config", host=self.host,
            )
        with _reported_lock:
            _reported.discard(self.control_path)
        self._touch()
        self._master_known = True
        return replace(state, left_s=self.persist_s)  # just used: a whole window

    def _login_error(self, said: str, prompted: bool) -> SSHError:
        where = self.target
        params = self._resolve()
        known = os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in said:
            return changed_host_key(params["hostname"], params["port"], known)
        if "Host key verification failed" in said:
            return unknown_host_key(params["hostname"], params["port"], params["user"], known)
        if not prompted and "Permission denied" in said:
            return SSHError(
                f"the SSH login to {where} needs a code or a password, and this process "
                f"cannot ask for one (no terminal): {LOGIN_HINT} in a terminal, then run "
                f"this again ({said[-200:]})", host=self.host,
            )
        if "Permission denied" in said and "keyboard-interactive" in said:
            return SSHError(
                f"the SSH login to {where} was refused at the code: a wrong or expired code "
                f"({said[-200:]}); nothing was submitted. Run `sheepdog login CONFIG` and "
                "type the current code", host=self.host,
            )
        return SSHError(f"the SSH login to {where} failed: {said[-500:] or 'no reason given'}",
                        host=self.host)

    def _touch(self) -> None:
        try:
            self._stamp().touch()
        except OSError:
            pass

    def logout(self) -> bool:
        """Close the master connection (every process's); True if one was open."""
        done = self._control("exit")
        return done.returncode == 0

    def _lapsed(self, said: str) -> SSHError:
        """The error for a call whose master is gone; said in the log once per lapse."""
        path = self.control_path
        with _reported_lock:
            first = path not in _reported
            _reported.add(path)
        if first:
            logger.warning("the SSH master connection to %s has closed; %s", self.host,
                           LOGIN_HINT)
        return SSHError(f"the SSH master connection to {self.host} is not open ({said[-200:]}); "
                        f"{LOGIN_HINT}", host=self.host)

    def ensure_master(self) -> None:
        """Make sure the master runs: open it (once per object), or fail naming the login."""
        if self._closed:
            raise SSHError(f"this connection to {self.host} was closed; make a new one",
                           host=self.host)
        if self._master_known:
            return
        try:
            self.login_master()
        except SSHError as exc:
            if not can_prompt() and "cannot ask" in str(exc):
                raise self._lapsed(str(exc)) from exc
            raise

    # --- the Remote interface --------------------------------------------------------

    def __enter__(self) -> OpenSSHRemote:
        self.ensure_master()
        return self

    def connect(self) -> Any:
        """Not available: OpenSSH gives no paramiko client (see :meth:`ensure_master`)."""
        raise SSHError("ssh_client='openssh' has no paramiko connection", host=self.host)

    def openssh(self) -> OpenSSHRemote:
        return self

    def close(self) -> None:
        """Stop this object's relays; the master stays open for the next process."""
        with self._lock:
            self._closed = True
            relays, self._relays = self._relays, []
        for relay in relays:
            stop(relay)

    def run(
        self,
        command: str,
        *,
        timeout_s: float = 120.0,
        check: bool = True,
        stdin: bytes | None = None,
        error: type[RemoteCommandError] = RemoteCommandError,
    ) -> CommandResult:
        """Run a shell command on the head node, after the preamble; raise ``error`` if it fails."""
        self.ensure_master()
        logger.debug("running on %s: %s", self.host, command)
        try:
            done = subprocess.run(
                [*self._base(), "--", self.host, self.preamble + command],
                input=stdin if stdin is not None else b"", capture_output=True,
                timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SSHError(
                f"command on {self.host} did not finish within {timeout_s:g} s: {command}",
                host=self.host,
            ) from exc
        out = done.stdout.decode("utf-8", "replace")
        err = done.stderr.decode("utf-8", "replace")
        if done.returncode == SSH_FAILED and not self.master().running:
            self._master_known = False
            raise self._lapsed(err.strip())
        self._touch()
        result = CommandResult(command, done.returncode, out, err)
        if check and done.returncode != 0:
            raise error(command, done.returncode, out, err, host=self.host)
        return result

    def login(self) -> Login:
        """How the master logged in: who, where, with which keys, and the host's key."""
        self.ensure_master()
        params = self._resolve()
        known = os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")
        entry = known_hosts_entry(params["hostname"], params["port"])
        host_key = "as in known_hosts (checked by OpenSSH)"
        try:
            found = subprocess.run(
                ["ssh-keygen", "-l", "-F", entry, "-f", known], capture_output=True,  # noqa: S607 - found on PATH like ssh itself
                stdin=subprocess.DEVNULL, timeout=CONTROL_TIMEOUT_S, check=False,
            ).stdout.decode("utf-8", "replace")
            # "host ED25519 SHA256:..." lines after a "# Host ... found" comment.
            keys = [line.split()[1:3] for line in found.splitlines()
                    if line and not line.startswith("#") and len(line.split()) >= 3]
            if keys:
                host_key = f"{keys[0][0]} {keys[0][1]}"
        except (OSError, subprocess.TimeoutExpired):
            pass
        return Login(user=params["user"], host=params["hostname"], port=params["port"],
                     keys=tuple(params["keyfiles"]), host_key=host_key, known_hosts=known)

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        """Make ``directory`` (mode 0700) and write each ``(name, text, mode)`` file into it.

        Each file is made with its mode before anything is written to it, and its text goes
        on ssh's stdin, never on a command line (a key file holds a secret).
        """
        absdir = self.absolute(directory)
        self.run(f"mkdir -p -m 700 {shlex.quote(absdir)} && chmod 700 {shlex.quote(absdir)}")
        for name, text, mode in files:
            target = shlex.quote(f"{absdir}/{name}")
            self.run(f"rm -f -- {target} && (umask 077 && : > {target}) && "
                     f"chmod {mode:o} {target} && cat > {target}",
                     stdin=text.encode("utf-8"), error=_FileError)

    def list_dir(self, directory: str) -> list[str] | None:
        """The names in an absolute ``directory``, or None if it does not exist."""
        path = shlex.quote(directory)
        found = self.run(f"[ -d {path} ] || exit {_MISSING}; cd {path} && "
                         "find . -mindepth 1 -maxdepth 1 -print0", check=False)
        if found.exit_status == _MISSING:
            return None
        self._check(found, f"list {directory}")
        return [name[2:] for name in found.stdout.split("\0") if name]

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of the file at an absolute ``path`` (see ``Host.read_bytes``)."""
        self.ensure_master()
        quoted = shlex.quote(path)
        read = f"exec cat -- {quoted}"
        if max_bytes is not None:
            # As over SFTP: a link is not followed, and no more than max_bytes + 1 are read.
            read = (f"[ -f {quoted} ] && [ ! -L {quoted} ] || exit {_NOT_REGULAR}; "
                    f"exec head -c {max_bytes + 1} -- {quoted}")
        try:
            done = subprocess.run(
                [*self._base(), "--", self.host,
                 f"[ -e {quoted} ] || [ -L {quoted} ] || exit {_MISSING}; {read}"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SSHError(f"reading {path} on {self.host} took over 120 s",
                           host=self.host) from exc
        if done.returncode == _MISSING:
            raise FileNotFoundError(path)
        if done.returncode == _NOT_REGULAR:
            raise NotARegularFileError(f"{path} is not a regular file")
        if done.returncode == SSH_FAILED and not self.master().running:
            self._master_known = False
            raise self._lapsed(done.stderr.decode("utf-8", "replace"))
        if done.returncode != 0:
            raise SSHError(f"cannot read {path} on {self.host}: "
                           f"{done.stderr.decode('utf-8', 'replace').strip()}", host=self.host)
        self._touch()
        if max_bytes is not None and len(done.stdout) > max_bytes:
            raise FileTooLargeError(f"{path} holds more than {max_bytes} bytes")
        return done.stdout

    def remove(self, path: str) -> None:
        """Delete the file at an absolute ``path``; one already gone is fine."""
        self._check(self.run(f"rm -f -- {shlex.quote(path)}", check=False), f"delete {path}")

    def rename(self, source: str, target: str) -> None:
        """Rename a file (absolute paths, one file system)."""
        self._check(self.run(f"mv -f -- {shlex.quote(source)} {shlex.quote(target)}",
                             check=False), f"rename {source}")

    def _check(self, result: CommandResult, what: str) -> None:
        if result.exit_status != 0:
            raise SSHError(f"cannot {what} on {self.host}: {result.stderr.strip()}",
                           host=self.host)


def remove_stale_socket(path: str) -> bool:
    """Delete a control socket that no master listens on; True if there was one.

    A master that was killed (or whose machine slept) leaves its socket behind. ``ssh -M``
    then finds the path taken, logs in all the same and runs without a master ("ControlSocket
    ... already exists, disabling multiplexing"): OpenSSH removes a stale socket only in
    ``ControlMaster=auto`` sessions, never for ``-O check`` or ``-M``.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(CONTROL_TIMEOUT_S)
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        logger.info("removed the stale SSH control socket %s (its master is gone)", path)
        return True
    except OSError:  # none there, or not ours to judge: ssh says what is wrong
        return False
    finally:
        probe.close()
    return False


class _FileError(RemoteCommandError):
    """A job file could not be written on the head node."""


def stop(proc: subprocess.Popen[bytes]) -> bytes:
    """End a process started by :meth:`OpenSSHRemote.start`: its stdin closes first (the
    relay sees EOF and exits), then it is terminated; bounded. Returns what it said on
    stderr."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    said = b""
    if proc.stderr is not None:
        try:
            said = proc.stderr.read()
        except (OSError, ValueError):  # closed already
            pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return said
