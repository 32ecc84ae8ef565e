"""Generate job files to send to the cluster.

A job file is a short Python script with its scheduler's directives in its leading
comment block: ``#!shell``, then for Grid Engine ``#$ -S shell``, ``#$ -t 1-N``
and the raw options (``scheduler_opts``/``ge_opts``) as ``#$`` lines, for
Slurm ``#SBATCH --array=1-N[%M]`` and ``#SBATCH`` lines; then a few lines that
run the worker stub, which sheepdog writes once per version beside the job files
(``sheepdog_worker-<digest>.py``, :func:`put_stub`), and call
``Client(url, None, request_id, job_index, secret_file=..., ...).go()``. The
memory and run-time limits of the call come from the directives, read by the
scheduler's class (``memory_limit_bytes``, ``run_limit_s``).

A job file never holds its request's secret: ``qsub`` hands the script to
Grid Engine, which copies it world-readable into every execution node's
spool (Slurm keeps a copy in its spool too). The secret goes into a key file
beside it (mode 0600, in the 0700 ``ssh_dir``), and the job file names that
file's path. Rendering is a pure function; :func:`write_job_file` does the
local I/O with owner-only modes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from .directives import check_line, check_prologue_line, check_raw_option, check_shell
from .errors import ConfigError, SheepdogError
from .files import write_whole
from .scheduler.base import Host, Scheduler
from .scheduler.gridengine import GridEngine
from .scheduler.local import LocalHost
from .stubfile import load_stub, stub_path, stub_source

__all__ = [
    "ADDRESS_FILE_MODE",
    "JOB_DIR_MODE",
    "JOB_FILE_MODE",
    "KEY_FILE_MODE",
    "STUB_FILE_MODE",
    "address_file_name",
    "job_file",
    "job_file_name",
    "job_head",
    "job_stem",
    "key_file_name",
    "put_stub",
    "spool_dir_name",
    "stub_file_name",
    "stub_path",
    "stub_source",
    "worker_limits",
    "write_job_file",
]

logger = logging.getLogger(__name__)

#: Job files: only their owner may read them (they name the key file and the server).
JOB_FILE_MODE = 0o700
#: Key files hold their request's secret: only their owner may read them.
KEY_FILE_MODE = 0o600
#: Address files hold no secret, but only their owner needs them.
ADDRESS_FILE_MODE = 0o600
#: The worker stub holds no secret; job files read it, so it need not be executable.
STUB_FILE_MODE = 0o600
#: The directory that holds job and key files: only its owner may list or enter it.
JOB_DIR_MODE = 0o700

_OPTION_TYPES = (bool, int, float, str, type(None))


def job_stem(request_id: int, secret: str) -> str:
    """Return the name, without suffix, of a request's job and key files (sheepdog_032_1a2b...).

    The original named job files ``sheepdog_<request id>.py``, which two databases
    sharing one ``ssh_dir`` both use: one would overwrite the other's file between
    copy and qsub. The tag is derived from the request's secret, so it differs
    between databases and any process holding the database can name the files
    again; being a hash with its own prefix, it reveals nothing of the secret
    (it is visible in ``qstat`` output).
    """
    tag = hashlib.sha256(b"sheepdog job file name\n" + secret.encode("ascii")).hexdigest()
    return f"sheepdog_{request_id:03d}_{tag[:12]}"


def job_file_name(request_id: int, secret: str) -> str:
    """Return the job file's name for a request: ``sheepdog_032_<tag>.py``."""
    return job_stem(request_id, secret) + ".py"


def key_file_name(request_id: int, secret: str) -> str:
    """Return the name of the file beside the job file that holds the request's secret."""
    return job_stem(request_id, secret) + ".key"


def spool_dir_name(request_id: int, secret: str) -> str:
    """Return the name of the directory beside the job file where workers spool results."""
    return job_stem(request_id, secret) + ".spool"


def address_file_name(request_id: int, secret: str) -> str:
    """Return the name of the file beside the job file that holds the server's ``host:port``.

    Workers read it at every reconnection (docs/connecting.rst); it holds no secret.
    """
    return job_stem(request_id, secret) + ".addr"


def stub_file_name() -> str:
    """Return the worker stub's file name beside the job files: ``sheepdog_worker-<digest>.py``.

    The digest is of the stub's text, so each version has its own file: jobs of another
    sheepdog version, queued or running, keep theirs.
    """
    digest = hashlib.sha256(stub_source().encode("utf-8")).hexdigest()
    return f"sheepdog_worker-{digest[:16]}.py"


def put_stub(host: Host, directory: str) -> str:
    """Write the worker stub into ``directory`` on ``host`` unless it is there; return its path.

    It is written once per version, whole: under a temporary name in the same directory,
    then renamed, so a worker never reads a part of it, and maps that write it at once
    all leave the same text (a file of that name is always whole: it is only ever made
    by the rename). ``directory`` is made 0700 as for the job files.
    """
    absdir = host.absolute(directory).rstrip("/")
    name = stub_file_name()
    target = f"{absdir}/{name}"
    if host.run(f"test -f {shlex.quote(target)}", check=False).exit_status == 0:
        return target
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    host.put(absdir or "/", [(temp, stub_source(), STUB_FILE_MODE)])
    try:
        host.rename(f"{absdir}/{temp}", target)
    except BaseException:
        with contextlib.suppress(OSError, SheepdogError):  # the rename's error says why
            host.remove(f"{absdir}/{temp}")
        raise
    logger.debug("wrote the worker stub %s", target)
    return target


def _check_secret(secret: str) -> None:
    # The message never shows the secret itself.
    if not isinstance(secret, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", secret):
        raise ConfigError(
            "the request secret must be a string of at least 32 hex characters (128 bits), "
            "as Storage.new_request creates it",
            key="secret",
        )


def _check_secret_file(secret_file: object) -> str:
    if not isinstance(secret_file, str) or not secret_file.startswith("/"):
        raise ConfigError(
            "job_file's second argument is the absolute path, on the cluster, of the file that "
            "holds the request's secret (job files no longer carry the secret itself: Grid "
            f"Engine copies them world-readable); got a {type(secret_file).__name__} that is not",
            key="secret_file",
        )
    return check_line("secret_file", secret_file)


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


def worker_limits(
    scheduler: type[Scheduler], options: Sequence[str], given: Mapping[str, object] | None = None,
) -> dict[str, int]:
    """The ``Client`` options for the workers' memory and run-time limits, from the directives.

    ``options`` are the job file's raw options (its directive lines);
    ``scheduler``'s class reads them. A limit ``given`` (not None) in the client
    options is kept. A value the scheduler's class cannot read sets no limit,
    with a warning, as the worker did when it read its job file.
    """
    limits: dict[str, int] = {}
    for key, read, what in (("mem_limit_bytes", scheduler.memory_limit_bytes, "memory"),
                            ("run_limit_s", scheduler.run_limit_s, "run-time")):
        if (given or {}).get(key) is not None:
            continue
        try:
            value = read(options)
        except ValueError as exc:
            logger.warning("the workers get no %s limit: %s", what, exc)
            continue
        if value is not None:
            limits[key] = value
    return limits


def job_head(
    shell: str,
    raw_options: Sequence[str],
    array_size: int,
    *,
    prologue: Sequence[str] | None = None,
    scheduler: type[Scheduler] = GridEngine,
    max_running: int | None = None,
) -> list[str]:
    """The first lines of a job file: interpreter, directives, prologue; Python follows them.

    Without a ``prologue`` the file starts ``#!shell``; with one, ``/bin/sh`` runs the
    prologue lines and then execs ``shell`` on the same file, which skips them as a
    string. Every value is checked as :func:`job_file` documents.
    """
    if isinstance(prologue, str):
        raise ConfigError("prologue must be a list of shell lines, not one string", key="prologue")
    prologue_lines = [check_prologue_line(i, line) for i, line in enumerate(prologue or ())]
    check_shell("shell", shell)
    key = "ge_opts" if scheduler.name == "gridengine" else "scheduler_opts"
    if isinstance(raw_options, str):
        raise ConfigError(f"{key} must be a list of strings, not one string", key=key)
    opts = [check_raw_option(key, i, opt, scheduler) for i, opt in enumerate(raw_options)]
    if not prologue_lines:
        return [f"#!{shell}",
                *scheduler.directives(shell, array_size, opts, max_running=max_running)]
    # sh runs the prologue, then execs the worker Python on this same file; to Python,
    # ''''true opens a string that the closing ''' ends, so it skips the shell block.
    # The directives stay above it: qsub and sbatch read them from the leading comments.
    return [
        "#!/bin/sh",
        *scheduler.directives("/bin/sh", array_size, opts, max_running=max_running),
        "''''true",
        *prologue_lines,
        f'exec {shlex.quote(shell)} "$0" "$@"',
        "'''",
    ]


def job_file(
    url: str,
    secret_file: str,
    request_id: int,
    n_args: int,
    shell: str,
    grid_engine_opts: Sequence[str],
    *,
    array_size: int | None = None,
    tls_fingerprint: str | None = None,
    client_options: Mapping[str, object] | None = None,
    prologue: Sequence[str] | None = None,
    scheduler: type[Scheduler] = GridEngine,
    max_running: int | None = None,
) -> str:
    """Format the job file for one request, ready for deployment.

    ``url`` is where workers reach the server; ``secret_file`` the absolute
    path, on the cluster, of the 0600 file that holds the request's secret
    (named by :func:`key_file_name`; the job file never holds the secret);
    ``n_args`` the number of tasks; ``shell`` the worker Python (used for
    ``#!`` and ``-S``); ``grid_engine_opts`` raw options for ``scheduler``, one
    directive line each (the name is the original's: they are sbatch options for
    Slurm). ``array_size`` makes the array smaller than ``n_args`` (each array
    task leases until no work is left). ``client_options`` are passed to the
    stub's ``Client`` (``batch``, ``retry_s``...), with ``mem_limit_bytes`` and
    ``run_limit_s`` from the directives unless they are given
    (:func:`worker_limits`). The job file runs the stub from
    :func:`stub_file_name` in the key file's directory (:func:`put_stub` puts
    it there). Raises
    ConfigError for a value that cannot be written safely, by the same rules
    as :class:`~sheepdog.Config`. ``prologue`` lines run in ``/bin/sh`` on the
    worker before it execs ``shell`` on this same file (``module load``,
    activating a virtualenv). ``scheduler`` writes the directive lines and
    names the variable that holds the array index (Grid Engine's by default);
    ``max_running`` is the throttle for a scheduler that writes it into the array
    range (Slurm), which Grid Engine takes as ``-tc`` among the options.
    """
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 1:
        raise ConfigError(f"request_id must be a positive int, not {request_id!r}")
    size = n_args if array_size is None else array_size
    for what, number in (("n_args", n_args), ("array_size", size)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{what} must be a positive int, not {number!r}", key=what)
    if not isinstance(url, str) or not re.match(r"https?://", url):
        raise ConfigError(f"the server URL must start with http:// or https://, not {url!r}")
    key_path = _check_secret_file(secret_file)
    head = job_head(shell, grid_engine_opts, size, prologue=prologue, scheduler=scheduler,
                    max_running=max_running)
    options = dict(client_options or {})
    options.update(worker_limits(scheduler, grid_engine_opts, options))
    if tls_fingerprint is not None:
        options["tls_fingerprint"] = tls_fingerprint
    options["secret_file"] = key_path
    stub_file = posixpath.join(posixpath.dirname(key_path), stub_file_name())
    lines = [
        *head,
        f"# sheepdog job file for request {request_id}: {n_args} tasks. It runs the worker stub"
        " beside it with",
        "# the request's arguments. The request's secret is not in here but in the key file that",
        "# the last line names (mode 0600).",
        "import sys",
        "",
        f"STUB = {stub_file!r}",
        "try:",
        '    with open(STUB, encoding="utf-8") as stub_file:',
        '        stub_code = compile(stub_file.read(), STUB, "exec")',
        "except OSError as e:  # ssh_dir is not on a file system this node shares",
        '    sys.stderr.write("sheepdog: cannot read the worker stub here (%s); the execution "',
        '                     "nodes must see ssh_dir at the same path\\n" % (e,))',
        f"    sys.exit({load_stub().EXIT_SECRET})",
        "exec(stub_code)  # the worker stub runs here, as if it were pasted into this file",
        "",
        'if __name__ == "__main__":',
        f"    Client({url!r}, None, {request_id!r},"
        f' int(os.environ.get("{scheduler.array_index_var}", "1"))'
        f"{_render_options(options)}).go()",
        "",
    ]
    return "\n".join(lines)


def write_job_file(
    text: str, directory: str | os.PathLike[str], request_id: int, secret: str
) -> Path:
    """Write a job file, its key file and the worker stub into ``directory`` (made 0700).

    Returns the job file's path. The job file is made 0700 and the key file, which
    holds ``secret``, 0600; the stub is written as :func:`put_stub` says.
    Render the job file with ``secret_file`` set to
    ``directory / key_file_name(request_id, secret)``.
    """
    _check_secret(secret)
    folder = Path(directory)
    folder.mkdir(mode=JOB_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, JOB_DIR_MODE)  # an existing directory may have been group-readable
    write_whole(folder / key_file_name(request_id, secret), secret + "\n", KEY_FILE_MODE)
    path = folder / job_file_name(request_id, secret)
    write_whole(path, text, JOB_FILE_MODE)
    put_stub(LocalHost(), str(folder.absolute()))
    logger.debug("wrote job file %s", path)
    return path
