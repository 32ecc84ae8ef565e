"""A head node stand-in (a Remote) for unit tests: it answers commands from a script.

The scheduler tests (tests/scheduler/test_slurm.py) and the watcher's (tests/test_watch.py)
run their scheduler on it: no SSH, no cluster. (tests/fake_ssh.py is another thing: a fake
``ssh`` program, for the OpenSSH client's tests.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sheepdog.remote import CommandResult, under_home

__all__ = ["FakeHead", "failed", "ok"]


class FakeHead:
    """A head node stand-in (a Remote): answers commands from a script, records what it is asked.

    ``answers`` maps a command's prefix to its answer (``""`` answers every command); any
    other command succeeds with no output. Files put on it are recorded, never written.
    """

    host = "head"

    def __init__(self, answers: dict[str, CommandResult] | None = None) -> None:
        self.answers = answers or {}
        self.commands: list[str] = []
        self.files: list[tuple[str, str, int]] = []
        self.closed = False
        self.preamble = ""

    def run(self, command: str, **_: Any) -> CommandResult:
        self.commands.append(command)
        for prefix, result in self.answers.items():
            if command.startswith(prefix):
                return result
        return CommandResult(command, 0, "", "")

    def absolute(self, directory: str) -> str:
        return under_home(directory, "/home/sheep")

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        self.files.extend(files)

    def list_dir(self, directory: str) -> list[str] | None:
        self.commands.append(f"list {directory}")
        return None  # no worker spooled anything

    def close(self) -> None:
        self.closed = True


def ok(stdout: str) -> CommandResult:
    """A command's answer: ``stdout``, exit status 0."""
    return CommandResult("", 0, stdout, "")


def failed(status: int, stderr: str) -> CommandResult:
    """A command's answer: exit ``status``, ``stderr``."""
    return CommandResult("", status, "", stderr)
