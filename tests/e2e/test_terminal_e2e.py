"""What a person sees in an 80-column terminal: a map with its bar, and every CLI command.

Each program runs on a pseudo-terminal of 80 columns, as in a real terminal
window, and every line it draws (a carriage return starts a new one, as the
bar redraws itself) must fit. The exceptions are the two commands whose output
is a file meant for redirection, ``worker-stub`` and ``jobfile``'s job file:
folding them would break them, so only what they write to stderr is checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

import sheepdog

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLUMNS = 80
WAIT_S = 300.0
#: Escape sequences tqdm and terminals use (cursor moves, colours); they take no columns.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

MAP_SCRIPT = """
import sheepdog


def square(x):
    if x % 10 == 3:
        raise ValueError(f"ends in 3: {x}")
    return x * x


results = sheepdog.map(square, range(50), "cluster.json")
print(results[:5])
"""


def run_in_terminal(argv: list[str], cwd: Path, *, stdout_too: bool = True) -> tuple[int, str]:
    """Run argv on an 80x24 pty (stdout and stderr, or only stderr); return (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(PYTHONPATH=str(REPO), TERM="xterm")
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=slave, stderr=slave,
        stdout=slave if stdout_too else subprocess.DEVNULL,
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
    else:
        proc.kill()
        raise AssertionError(f"{argv} did not finish within {WAIT_S} s")
    os.close(master)
    status = proc.wait(timeout=60)
    return status, b"".join(chunks).decode("utf-8", "replace")


def too_wide(output: str) -> list[str]:
    """Lines of terminal output wider than the terminal, each segment between \\r and \\n."""
    segments = ANSI.sub("", output).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [f"{len(line)}: {line}" for line in segments if len(line) > COLUMNS]


def sheepdog_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sheepdog", *argv]


def test_the_too_wide_check_sees_a_wide_line() -> None:
    assert too_wide("a\r" + "b" * 81 + "\n")
    assert not too_wide("\x1b[A" + "c" * 80 + "\r\n")


def test_a_map_and_every_command_fit_80_columns(config: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text(
        json.dumps(dict(config, dbfile="./sheepdog.sqlite")), encoding="utf-8"
    )
    db = tmp_path / "sheepdog.sqlite"
    (tmp_path / "job.py").write_text(MAP_SCRIPT, encoding="utf-8")
    status, output = run_in_terminal([sys.executable, "job.py"], tmp_path)
    assert status == 0, output
    text = ANSI.sub("", output)
    # It says what it does before the bar appears, then draws the bar.
    assert "sheepdog: connecting to " in text
    assert re.search(r"sheepdog: submitted job \d+ for request 1 \(50 tasks\)", text), text
    assert "request 1: 100%" in text
    # Every task ending in 3 failed: the summary names the first error in one line.
    assert "sheepdog: 5 of 50 tasks failed; task 4: ValueError: ends in 3: 3" in text, text
    assert "[0, 1, 4, None, 16]" in text
    assert not too_wide(output), "\n".join(too_wide(output))

    config_arg = ["--config", str(tmp_path / "cluster.json")]
    # The same database as the commands read (the file's dbfile is relative to tmp_path).
    slow = sheepdog.map_async(time.sleep, [60.0] * 2, dict(config, dbfile=str(db)))
    commands = [
        ["--help"],
        ["requests"],
        ["status", "1"],
        ["status", "1", "--wait", "--timeout", "60"],
        ["results", "1"],
        ["results", "1", "--json"],
        ["errors", "1"],
        ["logs", "1", "4"],
        ["cancel", str(slow), *config_arg],
        ["requests"],
        ["serve", "--timeout", "30"],
    ]
    commands += [[name, "--help"] for name in (
        "requests", "status", "results", "errors", "logs", "cancel", "serve", "worker-stub",
        "jobfile",
    )]
    seen = {}
    for argv in commands:
        status, output = run_in_terminal(sheepdog_command(*argv), tmp_path)
        assert status == 0, (argv, output)
        assert not too_wide(output), f"sheepdog {' '.join(argv)}:\n" + "\n".join(
            too_wide(output)
        )
        seen[" ".join(argv)] = ANSI.sub("", output)
    assert "Remote traceback" in seen["errors 1"]
    assert f"request {slow}: cancelled 2 open tasks" in seen[" ".join(commands[8])]
    assert "   4  failed     3     ValueError: ends in 3: 3" in seen["results 1"], seen
    assert "request 1: finished, 45/50 done, 5 failed, 0 running, 0 pending" in seen["status 1"]
    # The file-printing commands: only their stderr is for the terminal.
    (tmp_path / "mymodule.py").write_text("def simulate(seed):\n    return seed\n")
    for argv in (["worker-stub"],
                 ["jobfile", "mymodule:simulate", "--args", "[1, 2, 3]", *config_arg]):
        status, output = run_in_terminal(sheepdog_command(*argv), tmp_path, stdout_too=False)
        assert status == 0, (argv, output)
        assert not too_wide(output), "\n".join(too_wide(output))
