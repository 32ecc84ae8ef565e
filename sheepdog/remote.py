"""SSH to the cluster's head node: run commands, put files, one connection kept open.

One :class:`Remote` holds one SSH connection (paramiko), opened on first use,
reused for every command, and closed by :meth:`Remote.close` or at the end of
a ``with`` block. Host keys are checked strictly against known_hosts. It knows
nothing of any scheduler: a scheduler (:mod:`sheepdog.scheduler`) gives the
shell lines that set its commands up (``preamble``) and runs its commands here.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shlex
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

from .errors import (
    ConfigError,
    HostKeyError,
    RemoteCommandError,
    SSHError,
)
from .sftp import SFTPFiles

__all__ = ["CommandResult", "Login", "Remote", "has_terminal", "under_home"]

logger = logging.getLogger(__name__)

#: Bound on opening one command's channel on an established connection.
CHANNEL_OPEN_TIMEOUT_S = 30.0
#: An idle connection sends a keepalive this often (OpenSSH's ServerAliveInterval): after a
#: laptop's sleep, the first one meets the server's reset, so the connection is known dead
#: and the tunnel starts again, instead of counting as up while nothing sends.
KEEPALIVE_S = 30


@dataclass(frozen=True)
class CommandResult:
    """What a command printed and how it exited."""

    command: str
    exit_status: int
    stdout: str
    stderr: str



def under_home(directory: str, home: str | Callable[[], str]) -> str:
    """Resolve ``directory`` as the original did: absolute as given, else under ``home``.

    ``home`` may be a function, asked only for a relative directory (on a head node that
    costs a round trip).
    """
    if directory.startswith("~/"):
        directory = directory[2:]
    elif directory == "~":
        directory = ""
    if directory.startswith("/"):
        return directory.rstrip("/") or "/"
    base = home() if callable(home) else home
    return f"{base.rstrip('/')}/{directory}".rstrip("/")

@dataclass(frozen=True)
class Login:
    """How a :class:`Remote` logged in: user, host and port as resolved, the key files it
    offered (none: the ssh-agent and ~/.ssh), and the host key it accepted and where from."""

    user: str
    host: str
    port: int
    keys: tuple[str, ...]
    host_key: str
    known_hosts: str


def _no_delay(sock: object) -> None:
    """Send each SSH packet at once (TCP_NODELAY) on a TCP socket; leave other kinds alone.

    Through the tunnel an answer is often two packets (headers, then body). With
    Nagle's algorithm the second waited for the head node's delayed ACK: 40 ms in
    one call of ten (docs/benchmarks.rst, "Tunnel against direct").
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            logger.debug("cannot set TCP_NODELAY on the SSH connection: %s", exc)


class Remote(SFTPFiles):
    """Connect to a remote SSH server, run commands there and put files.

    ``Remote(host, port, user, keyfile=None)``, as the original's Deployer. The SSH
    config (``~/.ssh/config`` or ``ssh_config``) is honoured for HostName,
    User, Port, IdentityFile, ProxyCommand and ProxyJump; as the original
    documented, values found there win over ``port`` and ``user``.
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
        on_code: Callable[[Remote], Remote] | None = None,
    ) -> None:
        if keyfile is not None and not os.path.isfile(os.path.expanduser(keyfile)):
            # Dropping it would leave only "authentication failed" to go on.
            raise ConfigError(
                f"config key 'ssh_keyfile': {keyfile!r} does not exist or is not a file; "
                "give the path of your private key, or leave ssh_keyfile out to use your "
                "SSH agent and ~/.ssh keys",
                key="ssh_keyfile",
            )
        self.host = host
        self.port = port
        self.user = user
        self.keyfile = keyfile
        self.known_hosts = known_hosts
        self.ssh_config_path = ssh_config
        self.timeout_s = timeout_s
        #: Shell lines run before every command (a scheduler's environment set-up).
        self.preamble = preamble
        self._client: paramiko.SSHClient | None = None
        self._jump: Remote | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._home: str | None = None
        #: ssh_client="auto": given this Remote when the host asks for a code, it returns
        #: the (OpenSSH) Remote that takes its work over (None: paramiko only).
        self.on_code = on_code
        self._openssh: Remote | None = None
        self._said_choice = False

    # --- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Remote:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def openssh(self) -> Remote | None:
        """The OpenSSH remote that does this one's work, or None while paramiko does it.

        With ssh_client="auto", the first call logs in with paramiko; a host that asks for
        a second factor (keyboard-interactive) moves the work to OpenSSH, said in one log line.
        """
        if self._openssh is None and self.on_code is not None:
            try:
                self.connect()
            except _MovedToOpenSSH:
                pass
        return self._openssh

    def close(self) -> None:
        """Close the SSH connection (and a ProxyJump hop); safe to call twice."""
        with self._lock:
            if self._openssh is not None:
                self._openssh.close()
            self._closed = True
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._jump is not None:
                self._jump.close()
                self._jump = None

    @property
    def target(self) -> str:
        """``user@host:port`` as finally resolved, for messages."""
        params = self._resolve()
        return f"{params['user']}@{params['hostname']}:{params['port']}"

    def _read_ssh_config(self) -> paramiko.SSHConfig | None:
        path = Path(self.ssh_config_path or "~/.ssh/config").expanduser()
        if not path.is_file():
            return None
        try:
            return paramiko.SSHConfig.from_path(str(path))
        except Exception as exc:  # noqa: BLE001 - paramiko raises plain errors for bad files
            logger.warning("ignoring unreadable SSH config %s: %s", path, exc)
            return None

    def _resolve(self) -> dict[str, Any]:
        """Connection parameters: the SSH config's entry for the host wins, as in the original."""
        ssh_config = self._read_ssh_config()
        entry: dict[str, Any] = dict(ssh_config.lookup(self.host)) if ssh_config else {}
        keyfiles: list[str] = []
        if self.keyfile:
            keyfiles.append(os.path.expanduser(self.keyfile))
        keyfiles += [os.path.expanduser(k) for k in entry.get("identityfile", [])]
        return {
            "hostname": entry.get("hostname", self.host),
            "port": int(entry.get("port", self.port)),
            "user": entry.get("user", self.user) or _local_user(),
            "keyfiles": [k for k in keyfiles if os.path.exists(k)],
            "proxycommand": entry.get("proxycommand"),
            "proxyjump": entry.get("proxyjump"),
        }

    def connect(self) -> paramiko.SSHClient:
        """Open the SSH connection if it is not open; return the client."""
        with self._lock:
            if self._closed:
                raise SSHError(
                    f"this connection to {self.host} was closed; make a new one", host=self.host
                )
            transport = self._client.get_transport() if self._client else None
            if self._client is not None and transport is not None and transport.is_active():
                return self._client
            if self._client is not None:
                # A dead connection still holds a socket and paramiko's reader thread.
                self._client.close()
                self._client = None
            self._client = self._open()
            return self._client

    def _drop(self, client: paramiko.SSHClient) -> None:
        """Close ``client`` if it is still the current connection; the next call reconnects."""
        with self._lock:
            if self._client is client:
                self._client = None
                client.close()

    def _open(self) -> paramiko.SSHClient:
        params = self._resolve()
        hostname, port, user = params["hostname"], params["port"], params["user"]
        where = f"{user}@{hostname}:{port}"
        client = _Client(self._answer_prompts)
        known_hosts = os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")
        if os.path.exists(known_hosts):
            try:
                client.load_host_keys(known_hosts)
            except Exception as exc:  # paramiko raises plain errors for bad files
                raise HostKeyError(
                    f"cannot read known_hosts file {known_hosts}: {exc}", host=hostname
                ) from exc
        # Never accept an unknown key: that is how a man in the middle gets our job files.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())

        sock: Any = None
        if params["proxyjump"]:
            sock = self._jump_channel(params["proxyjump"], hostname, port)
        elif params["proxycommand"]:
            sock = paramiko.ProxyCommand(params["proxycommand"])

        key_filenames = params["keyfiles"] or None
        try:
            client.connect(
                hostname,
                port=port,
                username=user,
                key_filename=key_filenames,
                allow_agent=True,
                look_for_keys=self.keyfile is None,
                timeout=self.timeout_s,
                banner_timeout=self.timeout_s,
                auth_timeout=self.timeout_s,
                sock=sock,
            )
        except SSHError:  # from _answer_prompts: moved to OpenSSH, or no terminal
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise changed_host_key(hostname, port, known_hosts) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            tried = ", ".join(key_filenames or []) or "the ssh-agent and ~/.ssh/id_*"
            raise SSHError(
                f"SSH authentication as {where} failed ({exc}); tried {tried}. Install your "
                f"public key with `ssh-copy-id -p {port} {user}@{hostname}`, set ssh_keyfile, or "
                "add the key to your ssh-agent (encrypted keys need the agent).",
                host=hostname,
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise unknown_host_key(hostname, port, user, known_hosts) from exc
            raise SSHError(f"SSH connection to {where} failed: {exc}", host=hostname) from exc
        except (OSError, EOFError) as exc:
            client.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else str(exc)
            raise SSHError(
                f"cannot connect to {where}: {reason}. Check host and ssh_port, and that "
                "the head node is reachable from this machine.",
                host=hostname,
            ) from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(KEEPALIVE_S)
            _no_delay(transport.sock)
        logger.debug("connected to %s", where)
        if self.on_code is not None and not self._said_choice:
            self._said_choice = True
            logger.info("ssh_client=auto chose paramiko: %s took the key and asked for no "
                        "second factor, and your ssh config sets no ControlMaster", where)
        return client

    def _answer_prompts(self, transport: paramiko.Transport, username: str) -> None:
        """The host took our key and asks for more (keyboard-interactive): a second factor.

        ssh_client="auto" moves to OpenSSH; with a terminal the prompts are answered there
        (once per connection); without one this fails naming ssh_client="openssh".
        """
        where = self.target
        if self.on_code is not None:
            if self._openssh is None:
                self._openssh = self.on_code(self)
                logger.info("ssh_client=auto chose openssh: %s asks for a second factor "
                            "(keyboard-interactive), which OpenSSH asks once per login", where)
            raise _MovedToOpenSSH(f"{where} asks for a second factor", host=self.host)
        if not has_terminal():
            raise SSHError(
                f"{where} asks for a second factor (keyboard-interactive), and this process "
                "has no terminal to ask you for it; set ssh_client=\"openssh\" in the config "
                "and log in once with `sheepdog login CONFIG`", host=self.host,
            )
        transport.auth_interactive(username, _ask_on_terminal)

    def _jump_channel(self, proxyjump: str, hostname: str, port: int) -> paramiko.Channel:
        # ProxyJump may list several hops; we go through the last one, which itself
        # resolves its own ProxyJump from the SSH config, giving the chain.
        hop = proxyjump.split(",")[-1].strip()
        jump_user: str | None = None
        if "@" in hop:
            jump_user, hop = hop.rsplit("@", 1)
        jump_port = 22
        if re.match(r"^[^\[\]]+:\d+$", hop):
            hop, port_text = hop.rsplit(":", 1)
            jump_port = int(port_text)
        self._jump = Remote(
            hop,
            jump_port,
            jump_user,
            known_hosts=self.known_hosts,
            ssh_config=self.ssh_config_path,
            timeout_s=self.timeout_s,
        )
        transport = self._jump.connect().get_transport()
        if transport is None:
            raise SSHError(f"ProxyJump host {hop} closed the connection", host=hostname)
        try:
            return transport.open_channel(
                "direct-tcpip", (hostname, port), ("127.0.0.1", 0), timeout=self.timeout_s
            )
        except paramiko.SSHException as exc:
            raise SSHError(
                f"ProxyJump host {hop} could not open a channel to {hostname}:{port}: {exc}",
                host=hostname,
            ) from exc

    def login(self) -> Login:
        """How this connection logged in: who, where, with which keys, and the host's key."""
        if (other := self.openssh()) is not None:
            return other.login()
        params = self._resolve()
        client = self.connect()
        transport = client.get_transport()
        if transport is None:
            raise SSHError(f"the SSH connection to {self.host} closed", host=self.host)
        key = transport.get_remote_server_key()
        digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode("ascii")
        return Login(
            user=params["user"], host=params["hostname"], port=params["port"],
            keys=tuple(params["keyfiles"]),
            host_key=f"{key.get_name()} SHA256:{digest.rstrip('=')}",
            known_hosts=os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts"),
        )

    # --- commands ------------------------------------------------------------------

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
        if (other := self.openssh()) is not None:
            return other.run(command, timeout_s=timeout_s, check=check, stdin=stdin, error=error)
        full = self.preamble + command
        logger.debug("running on %s: %s", self.host, command)
        client, channel = self._open_session(command)
        try:
            channel.settimeout(timeout_s)
            channel.exec_command(full)
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
            out_file, err_file = channel.makefile("rb"), channel.makefile_stderr("rb")
            out = out_file.read().decode("utf-8", "replace")
            err = err_file.read().decode("utf-8", "replace")
            status = channel.recv_exit_status()
        except socket.timeout as exc:
            raise SSHError(
                f"command on {self.host} did not finish within {timeout_s:g} s: {command}",
                host=self.host,
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # A dropped connection is closed here and reopened on the next call.
            self._drop(client)
            raise SSHError(
                f"SSH connection to {self.host} failed while running {command!r}: {exc}",
                host=self.host,
            ) from exc
        finally:
            channel.close()  # frees the server's session slot (sshd's MaxSessions)
        result = CommandResult(command, status, out, err)
        if check and status != 0:
            raise error(command, status, out, err, host=self.host)
        return result

    def _open_session(self, command: str) -> tuple[paramiko.SSHClient, paramiko.Channel]:
        """A new session channel and its connection; one fresh connection is tried if the old
        one does not answer.

        The command has not started when opening fails, so trying again cannot run it twice.
        """
        for attempt in (1, 2):
            client = self.connect()
            transport = client.get_transport()
            try:
                if transport is None:
                    raise paramiko.SSHException("the connection is closed")
                return client, transport.open_session(timeout=CHANNEL_OPEN_TIMEOUT_S)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                logger.warning("SSH channel to %s failed (%s); reconnecting", self.host, exc)
                self._drop(client)
                if attempt == 2:
                    raise SSHError(
                        f"cannot open an SSH session on {self.host} to run {command!r}: {exc}",
                        host=self.host,
                    ) from exc
        raise AssertionError("unreachable")

    def home(self) -> str:
        """The remote user's home directory (absolute)."""
        if self._home is None:
            self._home = self.run('printf %s "$HOME"').stdout.strip()
        return self._home

    def absolute(self, directory: str) -> str:
        """Resolve a remote directory relative to the home directory, as the original did."""
        return under_home(directory, self.home)


def known_hosts_entry(hostname: str, port: int) -> str:
    """How known_hosts names a host: ``hostname``, or ``[hostname]:port`` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def changed_host_key(hostname: str, port: int, known_hosts: str) -> HostKeyError:
    """The error for a host key that does not match known_hosts, with what to do."""
    host_entry = known_hosts_entry(hostname, port)
    return HostKeyError(
        f"the host key of {hostname}:{port} does NOT match the one in {known_hosts}. "
        "Either the head node was reinstalled or someone is intercepting the "
        "connection. Check with your administrators; if the new key is genuine, remove "
        f"the old one with `ssh-keygen -f {shlex.quote(known_hosts)} -R "
        f"{shlex.quote(host_entry)}` and connect once with ssh to accept the new one.",
        host=hostname,
    )


def unknown_host_key(hostname: str, port: int, user: str, known_hosts: str) -> HostKeyError:
    """The error for a host key not in known_hosts (never accepted), with what to do."""
    host_entry = known_hosts_entry(hostname, port)
    return HostKeyError(
        f"the host key of {hostname}:{port} is not in {known_hosts}, and sheepdog "
        "never accepts unknown keys. Connect once with "
        f"`ssh -p {port} {user}@{hostname}` and check the fingerprint, or add it "
        f"with `ssh-keyscan -p {port} {shlex.quote(hostname)} >> "
        f"{shlex.quote(known_hosts)}` (entry {host_entry}); or set known_hosts in "
        "the config.",
        host=hostname,
    )


class _MovedToOpenSSH(SSHError):
    """ssh_client="auto" found that the host asks for a code: OpenSSH takes over."""


class _Client(paramiko.SSHClient):
    """paramiko's client, with a say in what happens when a host asks for a second factor.

    paramiko answers keyboard-interactive after a key by reading stdin unprompted; ``answer``
    (given the transport and user name) does it instead.
    """

    def __init__(self, answer: Callable[[paramiko.Transport, str], None]) -> None:
        super().__init__()
        self._answer = answer

    def _auth(self, username: str, *args: Any, **kwargs: Any) -> None:
        transport: paramiko.Transport | None = getattr(self, "_transport", None)
        if transport is not None:
            answer = self._answer

            def interactive(user: str, handler: Any = None, submethods: str = "") -> list[str]:
                answer(transport, user)
                return []

            transport.auth_interactive_dumb = interactive  # type: ignore[method-assign,assignment]
        super()._auth(username, *args, **kwargs)  # type: ignore[misc]


def has_terminal() -> bool:
    """Whether prompts can be answered on a terminal (stdin is one)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def _ask_on_terminal(title: str, instructions: str, prompts: Any) -> list[str]:
    """Answer a keyboard-interactive round on the terminal; hidden unless echo is asked."""
    import getpass

    if title or instructions:
        print("\n".join(x for x in (title, instructions) if x), file=sys.stderr)
    answers = []
    for prompt, echo in prompts:
        answers.append(input(prompt) if echo else getpass.getpass(prompt))
    return answers


def _local_user() -> str:
    import getpass

    return getpass.getuser()
