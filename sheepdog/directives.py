"""What a value must look like to be written into a job file: one rule for Config and job_file.

:class:`~sheepdog.config.Config` checks its values with these functions when it is
built, and the scheduler the raw options it refuses when it is opened (both before
anything is stored); :func:`~sheepdog.job_file.job_file` checks what it writes with
the same ones. So a config that is accepted always renders.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .scheduler.base import Scheduler

__all__ = [
    "LINE_BREAKS",
    "TRIPLE_QUOTE",
    "check_line",
    "check_prologue_line",
    "check_raw_option",
    "check_shell",
]

#: Characters that end a line for Python, the shell or Grid Engine: in a value they would end
#: its ``#$`` line (or shebang) in the job file and turn the rest into another directive or code.
LINE_BREAKS = re.compile(r"[\n\r\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

#: Ends the string that makes Python skip a prologue's shell block.
TRIPLE_QUOTE = "'" * 3


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: {message}", key=key)


def check_line(key: str, value: object) -> str:
    """Return ``value`` if it is a string that fits on one line of a job file; else raise."""
    if not isinstance(value, str):
        raise _fail(key, f"must be a string, not {type(value).__name__} ({value!r})")
    if LINE_BREAKS.search(value):
        raise _fail(
            key,
            f"{value!r} contains a line break or NUL, which would end its line in the job file "
            "and turn the rest into another directive; remove it",
        )
    return value


def check_raw_option(
    key: str, index: int, opt: object, scheduler: type[Scheduler] | None = None
) -> str:
    """Return raw option ``index`` of ``key`` (one directive line) if it is safe to write.

    Every scheduler: one line, starting with ``-``. With ``scheduler``, also none of the
    options that scheduler's jobs get from sheepdog (its ``reserved_option``).
    """
    text = check_line(f"{key}[{index}]", opt)
    what = f"a {scheduler.options_label} option" if scheduler is not None else "an option"
    if not text.strip().startswith("-"):
        raise _fail(key, f"entry {index} is not {what} (no leading '-'): {text!r}")
    if scheduler is None:
        return text
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    for word in words:
        why = scheduler.reserved_option(word)
        if why is not None:
            name = word.split("=", 1)[0]
            raise _fail(
                key,
                f"entry {index} ({text!r}) sets {name}, but {why}; remove {name} from {key}",
            )
    return text


def check_prologue_line(index: int, line: object) -> str:
    """Return prologue line ``index`` if it can sit in the shell block that Python skips."""
    if not isinstance(line, str):
        raise _fail(f"prologue[{index}]", f"must be a string, not {type(line).__name__}")
    if LINE_BREAKS.search(line) or TRIPLE_QUOTE in line:
        raise _fail(
            "prologue",
            f"line {index} contains a line break, a NUL or {TRIPLE_QUOTE} (which would end the "
            f"block that Python skips): {line!r}",
        )
    return line


def check_shell(key: str, shell: object) -> str:
    """Return the worker Python's path if it can go on the ``#!`` line and to ``qsub -S``."""
    text = check_line(key, shell)
    if not text.startswith("/") or re.search(r"\s", text):
        raise _fail(
            key,
            "must be an absolute path without spaces (it goes on the #! line and to qsub -S), "
            f"got {text!r}",
        )
    return text
