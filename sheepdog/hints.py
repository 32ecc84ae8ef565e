"""The ``sheepdog`` commands that messages and pages tell a person to run.

Each names its database last, quoted for a shell: a path with a space or a
quote in it is copied and pasted as it is.
"""

from __future__ import annotations

import shlex

__all__ = ["sheepdog_command"]


def sheepdog_command(*words: str | int, dbfile: str) -> str:
    """``sheepdog WORDS... --dbfile DBFILE``, the path quoted for a shell.

    ``words`` are sheepdog's own (a subcommand, a request id, flags, ``FILE`` as a
    placeholder) and go as they are.
    """
    return " ".join(["sheepdog", *map(str, words), "--dbfile", shlex.quote(dbfile)])
