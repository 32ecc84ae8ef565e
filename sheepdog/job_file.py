"""Generate job files to send to the cluster.

A job file is a Python script with Grid Engine directives in its leading
comment block: ``#!shell``, ``#$ -S shell``, ``#$ -t 1-N``, the user's
``ge_opts``, then the worker stub's source and a call
``Client(url, secret, request_id, job_index, ...).go()``. Rendering is a pure
function; :func:`write_job_file` does the local I/O with owner-only modes,
since a job file holds its request's secret.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import sheepdog

from .errors import ConfigError

__all__ = [
    "JOB_DIR_MODE",
    "JOB_FILE_MODE",
    "job_file",
    "job_file_name",
    "stub_path",
    "stub_source",
    "write_job_file",
]

logger = logging.getLogger(__name__)

#: Job files hold their request's secret: only their owner may read them.
JOB_FILE_MODE = 0o700
#: The directory that holds job files: only its owner may list or enter it.
JOB_DIR_MODE = 0o700

#: Options that sheepdog sets itself; a second one in ge_opts would conflict.
_RESERVED_OPTIONS = {
    "-t": "the array range is set by sheepdog from the number of arguments (array_size)",
    "-S": "the interpreter is set by sheepdog from the `shell` option",
}
# A line break would end the `#$` line and let the rest inject a directive or code.
_LINE_BREAKS = re.compile(r"[\n\r\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_OPTION_TYPES = (bool, int, float, str, type(None))


def stub_path() -> Path:
    """Return the path of the worker stub's source file, installed or in a source checkout."""
    installed = Path(sheepdog.__file__).parent / "_stub" / "sheepdog_worker.py"
    if installed.is_file():
        return installed
    checkout = Path(sheepdog.__file__).parent.parent / "worker_stub" / "sheepdog_worker.py"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        f"the worker stub is neither at {installed} (installed wheel) nor at {checkout} "
        "(source checkout): reinstall sheepdog"
    )


def stub_source() -> str:
    """Return the worker stub's source text, as pasted into every job file."""
    return stub_path().read_text(encoding="utf-8")


def job_file_name(request_id: int) -> str:
    """Return the job file's name for a request, as the original named it (sheepdog_032.py)."""
    return f"sheepdog_{request_id:03d}.py"


def _directive_value(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}: {value!r}")
    if _LINE_BREAKS.search(value):
        raise ConfigError(
            f"{what} {value!r} contains a line break, which would end its `#$` line in the "
            "job file and turn the rest into another directive; remove it",
            key=what.split()[0],
        )
    return value


def _check_ge_opt(opt: str) -> str:
    _directive_value("ge_opts entry", opt)
    try:
        words = shlex.split(opt)
    except ValueError:
        words = opt.split()
    for word in words:
        if word in _RESERVED_OPTIONS:
            raise ConfigError(
                f"ge_opts entry {opt!r} sets {word}, but {_RESERVED_OPTIONS[word]}; "
                f"remove {word} from ge_opts",
                key="ge_opts",
            )
    return opt


def _check_secret(password: str) -> None:
    # The message never shows the secret itself.
    if not isinstance(password, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", password):
        raise ConfigError(
            "the request secret must be a string of at least 32 hex characters (128 bits), "
            "as Storage.new_request creates it",
            key="password",
        )


def _check_prologue(prologue: Sequence[str] | None) -> list[str]:
    if prologue is None:
        return []
    if isinstance(prologue, str):
        raise ConfigError("prologue must be a list of shell lines, not one string", key="prologue")
    lines = []
    for line in prologue:
        if not isinstance(line, str) or _LINE_BREAKS.search(line) or "'''" in line:
            raise ConfigError(
                f"prologue line {line!r} must be a string without line breaks, NUL or ''' "
                "(which would end the shell block that Python skips)",
                key="prologue",
            )
        lines.append(line)
    return lines


def _render_options(options: Mapping[str, object]) -> str:
    parts = []
    for key, value in options.items():
        if not key.isidentifier() or not isinstance(value, _OPTION_TYPES):
            raise ConfigError(
                f"client option {key!r}={value!r} cannot be written into a job file: "
                "names must be identifiers and values None, bool, int, float or str",
                key="client_options",
            )
        parts.append(f"{key}={value!r}")
    return "".join(f", {part}" for part in parts)


def job_file(
    url: str,
    password: str,
    request_id: int,
    n_args: int,
    shell: str,
    grid_engine_opts: Sequence[str],
    *,
    array_size: int | None = None,
    tls_fingerprint: str | None = None,
    client_options: Mapping[str, object] | None = None,
    prologue: Sequence[str] | None = None,
) -> str:
    """Format the job file for one request, ready for deployment.

    ``url`` is where workers reach the server; ``password`` the request's
    secret (hex); ``n_args`` the number of tasks; ``shell`` the worker Python
    (used for ``#!`` and ``-S``); ``grid_engine_opts`` raw qsub options, one
    ``#$`` line each. ``array_size`` makes the array smaller than ``n_args``
    (each array task leases until no work is left). ``client_options`` are
    passed to the stub's ``Client`` (``batch``, ``retry_s``,
    ``mem_limit_bytes``). Raises ConfigError for a value that cannot be
    written safely. ``prologue`` lines run in ``/bin/sh`` on the worker before
    it execs ``shell`` on this same file (``module load``, activating a
    virtualenv).
    """
    prologue_lines = _check_prologue(prologue)
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 1:
        raise ConfigError(f"request_id must be a positive int, not {request_id!r}")
    size = n_args if array_size is None else array_size
    for what, number in (("n_args", n_args), ("array_size", size)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{what} must be a positive int, not {number!r}", key=what)
    if not isinstance(url, str) or not re.match(r"https?://", url):
        raise ConfigError(f"the server URL must start with http:// or https://, not {url!r}")
    _check_secret(password)
    _directive_value("shell", shell)
    if not shell.strip():
        raise ConfigError("shell must name the worker's Python interpreter", key="shell")
    if isinstance(grid_engine_opts, str):
        raise ConfigError("ge_opts must be a list of strings, not one string", key="ge_opts")
    opts = [_check_ge_opt(opt) for opt in grid_engine_opts]
    options = dict(client_options or {})
    if tls_fingerprint is not None:
        options["tls_fingerprint"] = tls_fingerprint
    if prologue_lines:
        # sh runs the prologue, then execs the worker Python on this same file; to Python,
        # ''''true opens a string that the closing ''' ends, so it skips the shell block.
        # The #$ lines stay above it: qsub reads directives from the leading comments.
        head = [
            "#!/bin/sh",
            "#$ -S /bin/sh",
            f"#$ -t 1-{size}",
            *(f"#$ {opt}" for opt in opts),
            "''''true",
            *prologue_lines,
            f'exec {shlex.quote(shell)} "$0" "$@"',
            "'''",
        ]
    else:
        head = [f"#!{shell}", f"#$ -S {shlex.quote(shell)}", f"#$ -t 1-{size}"]
        head += [f"#$ {opt}" for opt in opts]
    lines = [
        *head,
        f"# sheepdog job file for request {request_id}: {n_args} tasks. It holds the",
        "# request's secret: keep it private.",
        stub_source().rstrip("\n"),
        "",
        "",
        'if __name__ == "__main__":',
        f"    Client({url!r}, {password!r}, {request_id!r},"
        f' int(os.environ.get("SGE_TASK_ID", "1")){_render_options(options)}).go()',
        "",
    ]
    return "\n".join(lines)


def write_job_file(text: str, directory: str | os.PathLike[str], request_id: int) -> Path:
    """Write a job file into ``directory`` (created, mode 0700) with mode 0700; return its path."""
    folder = Path(directory)
    folder.mkdir(mode=JOB_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, JOB_DIR_MODE)  # an existing directory may have been group-readable
    path = folder / job_file_name(request_id)
    partial = folder / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, JOB_FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), JOB_FILE_MODE)  # an older partial file may have had other bits
            f.write(text)
        os.replace(partial, path)  # readers never see half a file
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.debug("wrote job file %s", path)
    return path
