"""The tunnel's part of an OpenSSH connection: a remote forward on the master, and the relay.

Part of :class:`~sheepdog.openssh.OpenSSHRemote`: :mod:`sheepdog.tunnel` opens a forward
from the head node's loopback to the server here, then starts the relay through the same
master, its stdin held open so that it exits when sheepdog stops it.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import SSHError

__all__ = ["OpenSSHTunnel"]


class OpenSSHTunnel:
    """Forward a port over the master and start a long-running command (a part of
    OpenSSHRemote)."""

    if TYPE_CHECKING:  # what OpenSSHRemote gives this part
        host: str
        _lock: threading.RLock
        _relays: list[subprocess.Popen[bytes]]

        def ensure_master(self) -> None: ...
        def _base(self, *, batch: bool = True) -> list[str]: ...
        def _control(
            self, command: str, extra: Sequence[str] = (),
        ) -> subprocess.CompletedProcess[bytes]: ...

    def forward(self, target: tuple[str, int]) -> int:
        """Open a remote forward on the master from a free loopback port of the head node
        to ``target`` here; return that port."""
        self.ensure_master()
        spec = f"0:{target[0]}:{target[1]}"
        done = self._control("forward", ["-R", spec])
        said = done.stdout.decode("utf-8", "replace").strip()
        if done.returncode != 0 or not said.isdigit():
            err = done.stderr.decode("utf-8", "replace").strip()
            raise SSHError(
                f"the SSH server on {self.host} refused to forward a port ({err or said}), "
                "so connect='tunnel' cannot work there: its sshd has AllowTcpForwarding set to "
                "no or local (ask the admins for 'remote' or 'yes'), or use connect='direct' "
                "with a localhost the execution nodes can reach", host=self.host,
            )
        return int(said)

    def cancel_forward(self, port: int, target: tuple[str, int]) -> None:
        """Close the remote forward :meth:`forward` opened (best effort)."""
        try:
            self._control("cancel", ["-R", f"{port}:{target[0]}:{target[1]}"])
        except SSHError:
            pass

    def stop_on_close(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc``, a local helper of a tunnel (its gate), when this object closes, as
        its relays are."""
        with self._lock:
            self._relays.append(proc)

    def start(self, command: str, timeout_s: float) -> tuple[subprocess.Popen[bytes], bytes]:
        """Start ``command`` on the head node through the master, with its stdin held open
        (it ends when the process is stopped); return it and its first line of output."""
        self.ensure_master()
        proc = subprocess.Popen(
            [*self._base(), "--", self.host, command], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        with self._lock:
            self._relays.append(proc)
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout_s
        fd = proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            data = os.read(fd, 256)
            if not data:
                break
            line += data
        return proc, line
