"""What a person sees in an 80-column terminal: a map with its bar, and every CLI command.

Each program runs on a pseudo-terminal of 80 columns, as in a real terminal
window, and every line it draws (a carriage return starts a new one, as the
bar redraws itself) must fit. The exceptions are the two commands whose output
is a file meant for redirection, ``worker-stub`` and ``jobfile``'s job file:
folding them would break them, so only what they write to stderr is checked.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from terminal import ANSI, run_in_terminal, too_wide

import sheepdog

pytestmark = pytest.mark.e2e


MAP_SCRIPT = """
import sheepdog


def square(x):
    if x % 10 == 3:
        raise ValueError(f"ends in 3: {x}")
    return x * x


results = sheepdog.map(square, range(50), "cluster.json")
print(results[:5])
"""


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
    assert ("sheepdog: request 1: 5 of 50 tasks failed; task 4: ValueError: ends in 3: 3"
            in " ".join(text.split())), text
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
