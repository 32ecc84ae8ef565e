"""Run a program as a person would, on an 80-column pseudo-terminal, and read what it drew."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = 80
WAIT_S = 300.0
#: Escape sequences tqdm and terminals use (cursor moves, colours); they take no columns.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def interruptible() -> None:
    """In a child about to start: Ctrl-C (SIGINT) does what it does in a terminal.

    A process started in the background by a non-interactive shell inherits SIGINT ignored,
    and so does every child it starts; Python then never raises KeyboardInterrupt. ci/test
    runs its lanes in the background (and CI may start the whole suite so), where a test's
    Ctrl-C would be ignored and the program run on. For ``subprocess.Popen(preexec_fn=...)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_terminal(
    argv: list[str], cwd: Path, *, stdout_too: bool = True,
    interrupt_when: Callable[[str], bool] | None = None, env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run argv on an 80x24 pty (stdout and stderr, or only stderr); return (status, output).

    With ``interrupt_when``, the terminal's Ctrl-C (SIGINT to the program) is sent
    once, as soon as that condition holds for the output so far.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    environ.update(PYTHONPATH=str(REPO), TERM="xterm", **(env or {}))
    proc = subprocess.Popen(
        argv, cwd=cwd, env=environ, stdin=slave, stderr=slave,
        stdout=slave if stdout_too else subprocess.DEVNULL, preexec_fn=interruptible,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
        if interrupt_when is not None and interrupt_when(
                ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))):
            proc.send_signal(signal.SIGINT)
            interrupt_when = None
    else:
        proc.kill()
        proc.wait(timeout=60)  # reaped here, not left to warn in a later test
        os.close(master)
        raise AssertionError(f"{argv} did not finish within {WAIT_S} s: it printed\n"
                             + b"".join(chunks).decode("utf-8", "replace")[-3000:])
    os.close(master)
    status = proc.wait(timeout=60)
    return status, b"".join(chunks).decode("utf-8", "replace")


def too_wide(output: str) -> list[str]:
    """Lines of terminal output wider than the terminal, each segment between \\r and \\n."""
    segments = ANSI.sub("", output).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [f"{len(line)}: {line}" for line in segments if len(line) > COLUMNS]
