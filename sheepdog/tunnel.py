"""Carry the workers' calls to this machine over sheepdog's own SSH connection.

For ``connect="tunnel"`` (and ``"auto"`` when it picks it; docs/connecting.rst):

- a remote port forward (paramiko's ``request_port_forward``) puts the server on
  a loopback port of the head node; each connection made there comes back as an
  SSH channel, which :func:`_pipe_channel` joins to a socket on the local server
  (with ``ssh_client="openssh"``, ``ssh -O forward -R 0:...`` on the master
  connection does it, and says which port it got; it forwards to a gate here,
  the relay's program run locally, which bounds those connections as
  :func:`_pipe_channel`'s caller does);
- a relay, :data:`RELAY_SOURCE` (sheepdog/programs/relay.py), which sheepdog starts on
  the head node over the same connection, listens where execution nodes reach
  the head node and pipes each connection to that loopback port. It exits when
  its SSH channel closes (it reads its stdin until EOF), so nothing is left
  running on the head node.

Workers read the relay's ``host:port`` from the request's address file at every
reconnection (:mod:`sheepdog.worker_address` writes it), so a relay started again on
another port after a dropped connection costs them one retry. It is a TCP pipe:
HTTPS with the pinned certificate goes through unchanged.
"""

from __future__ import annotations

import logging
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from .connect import ConnectMode
from .errors import SSHError
from .openssh import OpenSSHRemote, openssh_of, stop
from .programs import program_source
from .remote import Remote

__all__ = [
    "RELAY_SOURCE",
    "Probe",
    "Tunnel",
    "auto_choice",
    "choose_mode",
    "hold_open",
    "is_up",
    "probe_from_head",
    "switch_to_tunnel",
    "tunnel_for",
    "worker_address",
]

logger = logging.getLogger(__name__)

#: The head node's Python for the relay and the reachability probe (found on its PATH).
HEAD_PYTHON = "python3"
#: Bound on the relay saying which port it listens on.
RELAY_START_S = 30.0
#: Bound on the head node's TCP connection to the server when ``auto`` decides.
PROBE_TIMEOUT_S = 5.0
#: Bytes moved per read in the pipes.
CHUNK_BYTES = 65536

#: Connections the relay holds at most before any array task was counted (the doctor's probe).
RELAY_MIN_CONNECTIONS = 16
#: A relayed connection that moves no byte either way for this long is closed (workers
#: reconnect at their next call; the server closes its own idle ones after 30 s).
RELAY_IDLE_S = 120.0

#: The relay run on the head node as ``python3 -c RELAY_SOURCE BIND PORT TARGET_PORT
#: MAX_CONNECTIONS IDLE_S``: the text of :mod:`sheepdog.programs.relay`, which says what it does.
RELAY_SOURCE = program_source("relay")


class _Activity:
    """When a forwarded connection last moved a byte, either way."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.at


def _copy(read: Callable[[int], bytes], write: Callable[[bytes], None],
          done: Callable[[], None], activity: _Activity) -> None:
    """Copy until EOF, an error, or ``RELAY_IDLE_S`` without a byte either way; then
    half-close the other side."""
    try:
        while True:
            try:
                data = read(CHUNK_BYTES)
            except socket.timeout:
                if activity.idle_s() < RELAY_IDLE_S:
                    continue  # the other direction is busy
                break
            if not data:
                break
            activity.at = time.monotonic()
            write(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    try:
        done()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def _pipe_channel(channel: paramiko.Channel, target: tuple[str, int]) -> None:
    """Join one forwarded SSH channel to a new TCP connection to the local server."""
    try:
        sock = socket.create_connection(target, timeout=30)
    except OSError as exc:
        logger.warning("tunnel: cannot reach the local server at %s:%d: %s", *target, exc)
        channel.close()
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Reads wake up this often to see whether the connection has gone idle.
    wake_s = RELAY_IDLE_S / 4
    sock.settimeout(wake_s)
    channel.settimeout(wake_s)
    activity = _Activity()
    back = threading.Thread(
        target=_copy, args=(sock.recv, channel.sendall, channel.shutdown_write, activity),
        name="sheepdog-tunnel-back", daemon=True,
    )
    back.start()
    _copy(channel.recv, sock.sendall, lambda: sock.shutdown(socket.SHUT_WR), activity)
    back.join()
    channel.close()
    sock.close()


def _relay_answer_ok(line: bytes) -> bool:
    """Whether the relay's first line says where it listens: ``NAME PORT BOUND``."""
    words = line.decode("utf-8", "replace").split()
    return len(words) == 3 and words[1].isdigit()


class _Gate:
    """The relay program run here, between OpenSSH's forward and the server.

    ``ssh -R`` would connect every connection to the head node's loopback port
    straight to the server; anyone on the head node can open them. Through the
    gate they are bounded as the relay's and paramiko's pipes are: one thread,
    at most ``max_connections``, idle ones closed. It listens on 127.0.0.1 and
    exits when its stdin closes (:meth:`close`, or this process's end).
    """

    def __init__(self, target: tuple[str, int], max_connections: int) -> None:
        self.target = target
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY_SOURCE, "127.0.0.1", "0", str(target[1]),
             str(max_connections), f"{RELAY_IDLE_S:g}", target[0]],
            # Not a pipe: nobody reads it while the gate runs, and a full pipe would stop
            # the gate at its next line ("cannot reach" a server that is restarting).
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], RELAY_START_S)
        line = self.proc.stdout.readline() if ready else b""
        if not _relay_answer_ok(line):
            stop(self.proc)
            raise SSHError(f"the tunnel's gate on this machine did not start within "
                           f"{RELAY_START_S:g} s: it printed {line!r}", host="localhost")
        self.port = int(line.split()[1])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def allow(self, max_connections: int) -> None:
        """Let the gate hold ``max_connections`` at once."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"allow {max_connections}\n".encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        stop(self.proc)


class Tunnel:
    """A remote port forward and a relay on the head node, to one local server.

    ``target`` gives the local server's (host, port) when a connection comes (a
    restarted server keeps its port). :meth:`address` starts them, or starts them
    again when the SSH connection they ran on has gone.
    """

    def __init__(
        self, remote: Remote, target: Callable[[], tuple[str, int]], *,
        relay_address: str | None = None, connections_per_task: int = 4,
    ) -> None:
        # Weakly: the registry below is keyed weakly by the Remote, which must be free to go.
        self._remote = weakref.ref(remote)
        self.target = target
        self.relay_address = relay_address
        self.connections_per_task = connections_per_task
        #: Array tasks submitted through this tunnel; the relay holds
        #: ``connections_per_task`` connections for each (at least RELAY_MIN_CONNECTIONS).
        self.tasks = 0
        #: Forwarded connections being piped to the server now.
        self._piped = 0
        self._transport: paramiko.Transport | None = None
        self._relay: paramiko.Channel | None = None
        # Over OpenSSH: the relay's ssh process, and the forward's port and target.
        self._proc: subprocess.Popen[bytes] | None = None
        self._forward: tuple[OpenSSHRemote, int, tuple[str, int]] | None = None
        self._gate: _Gate | None = None
        self._address: tuple[str, int] | None = None
        self._loop_port = 0
        self._lock = threading.Lock()

    @property
    def remote(self) -> Remote:
        """The SSH connection the tunnel runs over."""
        remote = self._remote()
        if remote is None:
            raise SSHError("the tunnel's SSH connection was closed and dropped", host="")
        return remote

    @property
    def alive(self) -> bool:
        """Whether the forward's connection and the relay's channel are both still open."""
        if self._proc is not None:
            # Its ssh exits when the relay does, or when the master connection closes.
            return self._proc.poll() is None and self._gate is not None and self._gate.alive
        transport, relay = self._transport, self._relay
        return bool(
            transport is not None and transport.is_active() and relay is not None
            and not relay.closed and not relay.exit_status_ready()
        )

    @property
    def max_connections(self) -> int:
        """Connections the relay, and the forward behind it, hold at most at once."""
        return max(RELAY_MIN_CONNECTIONS, self.connections_per_task * self.tasks)

    def address(self, tasks: int = 0) -> tuple[str, int]:
        """Where execution nodes reach the relay: (head node's host name, port).

        ``tasks`` array tasks more will call through it: it allows
        ``connections_per_task`` more connections for each.
        """
        with self._lock:
            self.tasks += tasks
            if not self.alive or self._address is None:
                self._start()
            elif tasks:
                allow = f"allow {self.max_connections}\n".encode()
                try:
                    if self._proc is not None and self._proc.stdin is not None:
                        self._proc.stdin.write(allow)  # the relay's stdin, over OpenSSH
                        self._proc.stdin.flush()
                        if self._gate is not None:
                            self._gate.allow(self.max_connections)
                    else:
                        assert self._relay is not None
                        self._relay.sendall(allow)
                except (OSError, EOFError, paramiko.SSHException):
                    self._start()
            assert self._address is not None
            return self._address

    def _pipe(self, channel: paramiko.Channel) -> None:
        """Pipe one forwarded connection to the server, unless too many are piped now."""
        with self._lock:
            refused = self._piped >= self.max_connections
            if not refused:
                self._piped += 1
        if refused:
            # Anyone on the head node can connect to the loopback port: bounded as the relay.
            logger.warning("tunnel: refused a forwarded connection: %d are open, the most "
                           "allowed (relay_connections_per_task)", self._piped)
            channel.close()
            return
        try:
            _pipe_channel(channel, self.target())
        finally:
            with self._lock:
                self._piped -= 1

    def _start(self) -> None:
        self.close()
        openssh = openssh_of(self.remote)
        if openssh is not None:
            self._start_openssh(openssh)
            return
        transport = self.remote.connect().get_transport()
        if transport is None or not transport.is_active():
            raise SSHError("the SSH connection closed before the tunnel started",
                           host=self.remote.host)

        def handler(channel: paramiko.Channel, origin: object, server: object) -> None:
            # Called in paramiko's transport thread, which must not block.
            threading.Thread(target=self._pipe, args=(channel,),
                             name="sheepdog-tunnel", daemon=True).start()

        try:
            loop_port = transport.request_port_forward("127.0.0.1", 0, handler=handler)
        except paramiko.SSHException as exc:
            raise SSHError(
                f"the SSH server on {self.remote.host} refused to forward a port ({exc}), so "
                "connect='tunnel' cannot work there: its sshd has AllowTcpForwarding set to no "
                "or local (ask the admins for 'remote' or 'yes'), or use connect='direct' with "
                "a localhost the execution nodes can reach",
                host=self.remote.host,
            ) from exc
        self._transport, self._loop_port = transport, loop_port
        self._relay = relay = transport.open_session(timeout=RELAY_START_S)
        relay.settimeout(RELAY_START_S)
        relay.exec_command(self._relay_command(loop_port))
        line = b""
        try:
            while not line.endswith(b"\n"):
                data = relay.recv(256)
                if not data:
                    break
                line += data
        except (OSError, paramiko.SSHException) as exc:
            line = b"" if not line.endswith(b"\n") else line
            logger.debug("tunnel: no answer from the relay: %s", exc)
        if not _relay_answer_ok(line):
            err = b""
            while relay.recv_stderr_ready():
                err += relay.recv_stderr(65536)
            self.close()
            raise self._relay_failed(line, err)
        relay.settimeout(None)
        self._started(line, loop_port)

    def _start_openssh(self, openssh: OpenSSHRemote) -> None:
        """The same over OpenSSH: a forward on the master to a gate here, the relay through it."""
        self._gate = gate = _Gate(self.target(), self.max_connections)
        openssh.stop_on_close(gate.proc)  # should the tunnel itself never be closed
        target = ("127.0.0.1", gate.port)
        try:
            loop_port = openssh.forward(target)
        except BaseException:
            self.close()  # the gate
            raise
        self._forward = (openssh, loop_port, target)
        self._proc, line = openssh.start(self._relay_command(loop_port), RELAY_START_S)
        if not _relay_answer_ok(line):
            proc, self._proc = self._proc, None
            err = stop(proc)
            self.close()
            raise self._relay_failed(line, err)
        self._started(line, loop_port)

    def _relay_command(self, loop_port: int) -> str:
        """The command that starts the relay on the head node, forwarding to ``loop_port``."""
        return " ".join(shlex.quote(word) for word in (
            HEAD_PYTHON, "-c", RELAY_SOURCE, self.relay_address or "", "0", str(loop_port),
            str(self.max_connections), f"{RELAY_IDLE_S:g}"))

    def _relay_failed(self, line: bytes, err: bytes) -> SSHError:
        """The error for a relay that did not say where it listens."""
        return SSHError(
            f"the tunnel's relay did not start on {self.remote.host} within "
            f"{RELAY_START_S:g} s: it printed {line!r}, stderr "
            f"{err.decode('utf-8', 'replace')[-2000:]!r}; it needs {HEAD_PYTHON} on the "
            "head node's PATH",
            host=self.remote.host,
        )

    def _started(self, line: bytes, loop_port: int) -> None:
        """Take the relay's first line, ``NAME PORT BOUND``: where workers reach it."""
        name, port, bound = line.decode("utf-8", "replace").split()
        self._address = (self.relay_address or name, int(port))
        logger.info(
            "tunnel up: the relay on %s listens on %s:%s (%s), forwarded over SSH to the "
            "head node's 127.0.0.1:%d and on to this machine's server", self.remote.host,
            name, port, bound, loop_port,
        )
        if bound == "0.0.0.0":  # noqa: S104 - compares, binds nothing
            logger.warning(
                "tunnel: %s resolves its own name only to loopback, so the relay listens on "
                "every interface; set relay_address to the address the execution nodes "
                "reach it at", self.remote.host)

    def close(self) -> None:
        """Stop the relay (its channel closes, it sees EOF) and cancel the forward."""
        relay, transport, self._relay, self._transport = self._relay, self._transport, None, None
        proc, forward, self._proc, self._forward = self._proc, self._forward, None, None
        gate, self._gate = self._gate, None
        if proc is not None:
            stop(proc)
        if forward is not None:
            forward[0].cancel_forward(forward[1], forward[2])
        if gate is not None:
            gate.close()
        if relay is not None:
            relay.close()
        if transport is not None and transport.is_active():
            try:
                transport.cancel_port_forward("127.0.0.1", self._loop_port)
            except (paramiko.SSHException, OSError, EOFError):
                pass


#: Per SSH connection (held weakly: a closed map's Remote goes), its tunnels by server port.
_tunnels: weakref.WeakKeyDictionary[Remote, dict[int, Tunnel]] = weakref.WeakKeyDictionary()
_tunnels_lock = threading.Lock()


def tunnel_for(
    remote: Remote, target: Callable[[], tuple[str, int]], port: int, *,
    relay_address: str | None = None, connections_per_task: int = 4,
) -> Tunnel:
    """The one tunnel on this SSH connection (Remote) to the server on ``port``."""
    with _tunnels_lock:
        by_port = _tunnels.setdefault(remote, {})
        tunnel = by_port.get(port)
        if tunnel is None:
            tunnel = by_port[port] = Tunnel(
                remote, target, relay_address=relay_address,
                connections_per_task=connections_per_task,
            )
        return tunnel


@dataclass(frozen=True)
class Probe:
    """Whether the head node could open a TCP connection to the server, and what it said."""

    reachable: bool | None
    detail: str


#: Run on the head node as ``python3 -c PROBE_SOURCE HOST PORT TIMEOUT_S``: the text of
#: :mod:`sheepdog.programs.head_probe`.
PROBE_SOURCE = program_source("head_probe")


def probe_from_head(remote: Remote, host: str, port: int) -> Probe:
    """Try a TCP connection from the head node to ``host:port``, bounded; say how it went.

    ``reachable`` is None when the probe itself could not run (no python3 there).
    """
    command = " ".join(shlex.quote(word) for word in (
        HEAD_PYTHON, "-c", PROBE_SOURCE, host, str(port), f"{PROBE_TIMEOUT_S:g}"))
    try:
        result = remote.run(command, check=False, timeout_s=PROBE_TIMEOUT_S + 30)
    except SSHError as exc:
        return Probe(None, f"the probe did not run: {exc}")
    said = (result.stdout.strip() or result.stderr.strip())[-300:]
    if result.exit_status == 0:
        return Probe(True, said)
    if result.exit_status == 3:
        return Probe(False, said)
    return Probe(None, f"the probe exited with {result.exit_status}: {said}")


#: What ``auto`` chose, per SSH connection (held weakly) and server port: direct or tunnel.
_chosen: weakref.WeakKeyDictionary[Remote, dict[int, ConnectMode]] = weakref.WeakKeyDictionary()


def auto_choice(probe: Probe, head: str, where: str) -> tuple[ConnectMode, str]:
    """What ``auto`` picks after ``probe`` (from the head node ``head`` to the server at
    ``where``): ``"direct"`` or ``"tunnel"``, and why, as a clause ("the tunnel: ...")."""
    if probe.reachable is False:
        return ConnectMode.TUNNEL, (f"the tunnel: the head node {head} cannot open the "
                                    f"server's address {where} ({probe.detail})")
    then = "it moves to the tunnel if array tasks run but none calls in"
    if probe.reachable:
        return ConnectMode.DIRECT, (f"direct: the head node {head} reaches the server at "
                                    f"{where}; {then}")
    return ConnectMode.DIRECT, (f"direct: could not test from the head node {head} whether it "
                                f"reaches {where} ({probe.detail}); {then}")


def choose_mode(
    connect: str, host: object, server_host: str, server_port: int
) -> ConnectMode:
    """``"direct"`` or ``"tunnel"`` for workers reaching ``server_host:server_port``.

    ``connect`` is the config's key; ``host`` the scheduler's host (a tunnel needs an SSH
    connection: a local scheduler's workers always connect directly). ``auto`` asks the
    head node once per connection and server, and says in one log line what it chose and why.
    """
    if not isinstance(host, Remote):
        return ConnectMode.DIRECT
    if connect != ConnectMode.AUTO:
        return ConnectMode(connect)
    known = _chosen.get(host, {}).get(server_port)
    if known is not None:
        return known
    probe = probe_from_head(host, server_host, server_port)
    mode, why = auto_choice(probe, host.host, f"{server_host}:{server_port}")
    logger.info("connect=auto chose %s", why)
    _chosen.setdefault(host, {})[server_port] = mode
    return mode


def is_up(host: object, server_port: int) -> bool:
    """Whether a tunnel to the server on ``server_port`` is up (a local scheduler needs
    none, so it counts as up)."""
    if not isinstance(host, Remote):
        return True
    # Any connection's tunnel to that server will do (map_async's, held open, for a
    # get_results that watches on a connection of its own): a local port is one server.
    with _tunnels_lock:
        found = [by_port.get(server_port) for by_port in list(_tunnels.values())]
    return any(t is not None and t.alive for t in found)


#: SSH connections kept open for their tunnels after the call that opened them returned
#: (map_async): the workers reach the server through them until the process exits.
_held: list[Remote] = []


def hold_open(host: object) -> bool:
    """Keep ``host``'s SSH connection open if a tunnel runs on it; True if it does."""
    if not isinstance(host, Remote) or not any(t.alive for t in _tunnels.get(host, {}).values()):
        return False
    with _tunnels_lock:
        if all(held is not host for held in _held):
            _held.append(host)
    return True


def is_held(host: object) -> bool:
    """Whether :func:`hold_open` keeps ``host``'s connection open."""
    return any(held is host for held in _held)


def switch_to_tunnel(host: object, server_port: int) -> None:
    """From now on, ``auto`` uses the tunnel for this connection and server."""
    if isinstance(host, Remote):
        _chosen.setdefault(host, {})[server_port] = ConnectMode.TUNNEL


def worker_address(
    mode: ConnectMode, host: object, server_port: int, target: Callable[[], tuple[str, int]],
    direct: tuple[str, int], *, relay_address: str | None = None,
    connections_per_task: int = 4, tasks: int = 0,
) -> tuple[str, int]:
    """Where workers reach the server in ``mode``: ``direct``, or the relay (started if need be).

    ``tasks`` more array tasks will call through the relay (see :meth:`Tunnel.address`).
    """
    if mode != ConnectMode.TUNNEL or not isinstance(host, Remote):
        return direct
    return tunnel_for(
        host, target, server_port, relay_address=relay_address,
        connections_per_task=connections_per_task,
    ).address(tasks)
