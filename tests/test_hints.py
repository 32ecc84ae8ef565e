"""The commands that messages tell a person to run quote the database path for a shell."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from sheepdog.hints import sheepdog_command

ODD_PATH = "/home/me/my runs/it's.sqlite"


def test_a_command_names_the_database_last_quoted_for_a_shell() -> None:
    command = sheepdog_command("cancel", 7, "--config", "FILE", dbfile=ODD_PATH)
    assert shlex.split(command) == [
        "sheepdog", "cancel", "7", "--config", "FILE", "--dbfile", ODD_PATH]
    assert sheepdog_command("serve", dbfile="./sheepdog.sqlite") == (
        "sheepdog serve --dbfile ./sheepdog.sqlite")


class _OpenRequest:
    """A storage whose request 3 still has an open task."""

    def open_task_indices(self, request_id: int) -> list[int]:
        return [1]


@pytest.mark.parametrize("waiting", [False, True])
def test_the_cli_unserved_note_quotes_a_path_with_a_space(
    monkeypatch: pytest.MonkeyPatch, waiting: bool
) -> None:
    from sheepdog import cli

    monkeypatch.setattr(cli, "served", lambda storage, request_id: False)
    storage: Any = _OpenRequest()
    note = cli._unserved_note(storage, 3, ODD_PATH, waiting=waiting)
    assert note is not None
    flat = " ".join(note.split())  # folded at 79 columns, between words
    assert f"`sheepdog serve --dbfile {shlex.quote(ODD_PATH)}`" in flat
    other = "attach 3" if waiting else "cancel 3 --config FILE"
    assert f"`sheepdog {other} --dbfile {shlex.quote(ODD_PATH)}`" in flat
