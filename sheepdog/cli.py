"""The ``sheepdog`` command: look at requests, fetch results, cancel, restart the server.

``sheepdog --help`` lists the commands and ``sheepdog COMMAND --help`` explains
one. Every command that reads a database takes ``--dbfile`` (default: the
``SHEEPDOG_DBFILE`` environment variable, else ``./sheepdog.sqlite`` as the
library). Errors are one line on stderr with exit status 1; a wrong command
line exits with status 2. Output fits 80 columns; a closed pipe (``| head``)
ends a command quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import reprlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import serialisation
from .api import (
    RERUN_DEFAULT,
    cancel_request,
    get_errors,
    get_output,
    rerun,
    served,
    stop_interrupted,
)
from .config import Config, as_config
from .doctor import DEFAULT_TIMEOUT_S, doctor, render_check
from .errors import RemoteError, SheepdogError
from .hints import sheepdog_command
from .job_file import job_file, job_stem, key_file_name, stub_source
from .progress import TASK_STATE_WORDS, format_counts, request_state, started
from .scheduler import open_scheduler, scheduler_class
from .sizing import array_size, batch_size
from .store import DEFAULT_DBFILE, RERUN_CHOICES, RequestState, Storage, TaskState
from .store.db import require_database
from .stored_request import StoredRequest
from .version import __version__
from .watch import wait_for_request

__all__ = ["main"]

logger = logging.getLogger(__name__)

#: Environment variable naming the database, so that --dbfile need not be repeated.
DBFILE_ENV = "SHEEPDOG_DBFILE"
#: Output is kept to this many columns where it is a table or a summary.
COLUMNS = 80
#: What ``sheepdog doctor`` checks without a CONFIG: the file docs/getting-started.rst writes.
DOCTOR_DEFAULT_CONFIG = "cluster.json"
#: Names the key file in a job file that ``sheepdog jobfile`` renders: never a real secret.
PLACEHOLDER_SECRET = "0" * 64


class CliError(Exception):
    """A problem to report as one line and exit status 1."""


def _require_db(dbfile: str) -> None:
    """Refuse a ``--dbfile`` that does not exist, saying how to name one: never create it."""
    require_database(dbfile, f"pass --dbfile PATH or set {DBFILE_ENV}")


def _open_db(dbfile: str) -> Storage:
    """The database a command reads, which must exist (see :func:`_require_db`)."""
    _require_db(dbfile)
    return Storage(dbfile, create=False)


def _value_text(value: Any, width: int = 200) -> str:
    """A repr cut to ``width``, made without a whole repr of a large value first."""
    if isinstance(value, (bytes, bytearray, str)):
        text = repr(value[: width + 1])  # a 200 MB result's repr would take 800 MB
    else:
        text = _SHORT_REPR.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = 300
    return short


#: Cuts long containers and strings while it builds a repr (reprlib's limits).
_SHORT_REPR = _short_repr()


def _fold(text: str) -> str:
    """Fold lines wider than the terminal (remote tracebacks), indenting the rest of each."""
    if not sys.stdout.isatty():
        return text
    # Not narrower than the indent of a folded line and a word, or nothing would fit.
    width = max(20, shutil.get_terminal_size((COLUMNS, 24)).columns)
    out = []
    for line in text.splitlines():
        while len(line) > width:
            # Between words where there is a space to break at (not inside a date or a
            # name); a word longer than the line (a path) is cut where the line ends.
            indent = len(line) - len(line.lstrip(" "))
            cut = line.rfind(" ", indent + 1, width + 1)
            if cut <= indent:
                cut = width
            out.append(line[:cut].rstrip())
            rest = line[cut:].lstrip(" ")
            if not rest:
                break
            line = "    " + rest
        else:
            out.append(line)
    return "\n".join(out)


def _json_text(value: Any) -> str:
    """The value as JSON; one that JSON cannot hold as ``{"repr": ...}`` (cut to 1000)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return json.dumps({"repr": _value_text(value, 1000)})


def _each_result(storage: Storage, request_id: int) -> Iterator[tuple[Any, Any]]:
    """Each task's ``(arg, result or None)``, read one at a time: one value in memory."""
    for arg, result in storage.get_tasks_with_stored_results(request_id):
        yield _load(storage, arg), None if result is None else _load(storage, result)


def _load(storage: Storage, stored: bytes | str) -> Any:
    with storage.open_value(stored) as f:  # a large value from its blob file, not a copy
        return serialisation.deserialise_file(f)


def _ago(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


def _short_time(created: float) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(created))


# --- commands -----------------------------------------------------------------------


def _unserved_note(
    storage: Storage, request_id: int, dbfile: str, *, waiting: bool = False
) -> str | None:
    """A line saying that no server serves an open request, and what to run; else None.

    ``waiting``: for a wait (``--wait``), which would otherwise sit at the same count.
    """
    if not storage.open_task_indices(request_id) or served(storage, request_id) is not False:
        return None
    serve = sheepdog_command("serve", dbfile=dbfile)
    if waiting:
        text = (
            f"request {request_id} has open tasks but no server is serving it, so this wait "
            f"may never end: serve and wait with "
            f"`{sheepdog_command('attach', request_id, dbfile=dbfile)}`, or run `{serve}` "
            "beside this wait"
        )
    else:
        text = (
            f"request {request_id} has open tasks but no server is serving it: its array "
            f"tasks cannot report. Run `{serve}`, or "
            f"`{sheepdog_command('cancel', request_id, '--config', 'FILE', dbfile=dbfile)}`"
        )
    # Folded between words, so that it fits an 80-column terminal as the table does.
    return textwrap.fill(text, COLUMNS - 1, break_long_words=False, break_on_hyphens=False)


def cmd_requests(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile) as storage:
        rows = storage.list_requests()
        if not rows:
            print(f"no requests in {args.dbfile}")
            return 0
        notes = []
        counts: dict[int, list[Any]] = {}
        for row in rows:
            c = started(storage.task_counts(row["id"]), len(storage.running_indices(row["id"])))
            counts[row["id"]] = [
                row["n_tasks"], c[TaskState.DONE], c[TaskState.ERROR], c[TaskState.CANCELLED],
                c[TaskState.LEASED], c[TaskState.PENDING], request_state(row["state"], c),
            ]
        # Each count's column is as wide as its header or its widest number, whichever is
        # wider: 70 columns for requests of fewer than 10,000 tasks, 8 left for the label.
        heads = ("TASKS", "DONE", "FAILED", "CANCELLED", "RUNNING", "PENDING")
        widths = [max(len(head), *(len(str(cells[i])) for cells in counts.values()))
                  for i, head in enumerate(heads)]
        numbers = " ".join(f"{head:>{w}}" for head, w in zip(heads, widths))
        print(f"{'ID':>4} {'CREATED':11} {'STATE':9} {numbers}  LABEL")
        for row in rows:
            cells = counts[row["id"]]
            numbers = " ".join(f"{n:>{w}}" for n, w in zip(cells[:6], widths))
            line = f"{row['id']:>4} {_short_time(row['created']):11} {cells[6]:9} {numbers}"
            label = row["label"] or ""
            print(f"{line}  {label[: max(0, COLUMNS - len(line) - 2)]}".rstrip())
            note = _unserved_note(storage, row["id"], args.dbfile)
            if note is not None:
                notes.append(note)
        for note in notes:  # on stderr: `sheepdog requests | tail -1` gets the table's end
            print(note, file=sys.stderr)
    return 0


def _wait(args: argparse.Namespace) -> None:
    """``--wait``: wait for request ``args.id``, first saying if nothing serves it."""
    with _open_db(args.dbfile) as storage:
        note = _unserved_note(storage, args.id, args.dbfile, waiting=True)
    if note is not None:
        print(note, file=sys.stderr, flush=True)
    wait_for_request(args.dbfile, args.id, verbose=True, timeout_s=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    if args.wait:
        _wait(args)
    with _open_db(args.dbfile) as storage:
        counts = started(storage.task_counts(args.id), len(storage.running_indices(args.id)))
        total = storage.count_tasks(args.id)
        state = request_state(storage.get_request_state(args.id), counts)
        jobs = storage.get_jobs(args.id)
        cached = storage.count_cached(args.id)
        note = _unserved_note(storage, args.id, args.dbfile)
    from_cache = f" ({cached} from the cache)" if cached else ""
    print(f"request {args.id}: {state}, {format_counts(counts, total)}{from_cache}")
    for job in jobs:
        where = f", server port {job.port}" if job.port else ""
        print(f"  job {job.job_id}: {job.array_size} array tasks, submitted "
              f"{_ago(job.submitted)}{where}")
    if note is not None:
        print(note, file=sys.stderr)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    if args.wait:
        _wait(args)
    with _open_db(args.dbfile) as storage:
        states = storage.task_states(args.id)  # an unknown id fails here, clearly
        running = storage.running_indices(args.id)
        # Cancelled tasks too (get_errors leaves them out: they did not fail).
        errors: dict[int, RemoteError] = {
            index: RemoteError.from_dict(error, request_id=args.id, task_index=index)
            for index, _, error in storage.get_task_errors(args.id)
        }
        if args.json:
            _results_json(storage, args.id, states, running, errors)
            return 0
        arg_texts = [_value_text(_load(storage, arg), 30)
                     for arg, _ in storage.get_tasks_with_stored_results(args.id)]
        args_width = max([len("ARGS"), *map(len, arg_texts)])
        task_width = max(4, len(str(len(states))))
        print(f"{'TASK':>{task_width}}  {'STATE':9}  {'ARGS':{args_width}}  RESULT")
        for i, ((_, result), state) in enumerate(
                zip(_each_result(storage, args.id), states), start=1):
            _print_result_row(i, result, state, running, errors, task_width, args_width,
                              arg_texts[i - 1])
    return 0


def _results_json(
    storage: Storage, request_id: int, states: list[str], running: set[int],
    errors: dict[int, RemoteError],
) -> None:
    """``results --json``: a list of tasks with their state and error, one in memory at once."""
    sys.stdout.write("[")
    for i, ((arg, result), state) in enumerate(
            zip(_each_result(storage, request_id), states), start=1):
        waits = state == TaskState.LEASED and i not in running
        word = TASK_STATE_WORDS[TaskState.PENDING if waits else state]
        error = errors.get(i)
        # One key a line, as json.dump(indent=1) would: a terminal's 80 columns.
        sys.stdout.write(
            f'{"," if i > 1 else ""}\n {{\n  "index": {i},\n  "state": {json.dumps(word)},\n'
            f'  "args": {_json_text(arg)},\n  "result": {_json_text(result)},\n  "error": '
            f'{json.dumps(None if error is None else error.summary)}\n }}'
        )
    sys.stdout.write("\n]\n")


def _print_result_row(
    i: int, result: Any, state: str, running: set[int], errors: dict[int, RemoteError],
    task_width: int, args_width: int, arg_text: str,
) -> None:
    """One row of ``results``: task, state, argument and result (or the error), cut to fit."""
    # A leased task that its worker has not started yet waits, as a pending one.
    waits = state == TaskState.LEASED and i not in running
    word = TASK_STATE_WORDS[TaskState.PENDING if waits else state]
    head = f"{i:>{task_width}}  {word:9}  {arg_text:{args_width}}  "
    room = max(10, COLUMNS - 1 - len(head))
    # Only a done task has a result; None there is a real None, not a gap.
    if state == TaskState.DONE:
        text = _value_text(result, room)
    elif i in errors:
        text = errors[i].summary
        text = text if len(text) <= room else text[: room - 3] + "..."
    else:
        text = "-"
    print(head + text)


def cmd_errors(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile):
        pass
    errors = get_errors(args.id, args.dbfile)
    if not errors:
        print(f"request {args.id}: no errors")
    for arg, error in errors:
        print(_fold(f"--- task {error.task_index} ({error.kind}), args {_value_text(arg, 40)}"))
        print(_fold(str(error)))
    return 0


#: How much of a running task's array task output ``logs`` shows: its end.
RUNNING_OUTPUT_BYTES = 64 * 1024


def _running_output(storage: Storage, request_id: int, task: dict[str, Any]) -> list[str]:
    """What a running task's array task wrote so far (its .o and .e files), as lines."""
    worker, host = str(task.get("worker") or ""), task.get("host") or "a node"
    lines = [textwrap.fill(f"request {request_id} task {task['idx']} is still running on "
                           f"{host}; its array task's output so far (the worker's, of every "
                           "task it ran):", COLUMNS)]
    array_index = worker.rsplit(":", 1)[-1]
    request = StoredRequest(storage, request_id)
    try:
        stored = request.stored_scheduler() if array_index.isdigit() else None
        if stored is None:
            return lines + ["(no stored config: its output files cannot be found)"]
        config, opened = stored
        name = request.job_name()
        with opened as scheduler:
            jobdir = scheduler.host.absolute(config.ssh_dir).rstrip("/")
            for job in reversed(request.jobs()):
                found = []
                for kind in ("o", "e"):
                    path = f"{jobdir}/{name}.{kind}{job.job_id}.{array_index}"
                    try:
                        data = scheduler.host.read_bytes(path)[-RUNNING_OUTPUT_BYTES:]
                    except (OSError, SheepdogError):
                        continue
                    found += [f"--- {path}", data.decode("utf-8", "replace")]
                if found:
                    return lines + found
    except SheepdogError as exc:
        return lines + [f"(could not read its output files: {exc})"]
    return lines + ["(no output file yet)"]


def cmd_logs(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile) as storage:
        task = storage.get_task(args.id, args.index)
        if task["state"] == TaskState.LEASED:
            for line in _running_output(storage, args.id, task):
                print(line.rstrip("\n"))
            return 0
    stdout, stderr = get_output(args.id, args.index, args.dbfile)
    if args.stream in ("both", "stdout"):
        if args.stream == "both":
            print(f"--- stdout of request {args.id} task {args.index}")
        sys.stdout.write(stdout)
    if args.stream in ("both", "stderr"):
        if args.stream == "both":
            print(f"--- stderr of request {args.id} task {args.index}")
        sys.stdout.write(stderr)
    sys.stdout.flush()
    return 0


def _leftover_files(storage: Storage, request_id: int, names: list[str]) -> list[str]:
    """The names (of those in its job directory) of a request's files: its job file, key,
    address, array task output (.o/.e), spool, and local jobs' state files."""
    stem = job_stem(request_id, storage.get_secret(request_id)) + "."
    states = {f".local-job-{job.job_id}.json" for job in storage.get_jobs(request_id)}
    return sorted(name for name in names if name.startswith(stem) or name in states)


def cmd_clean(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile) as storage:
        finished = [row["id"] for row in storage.list_requests()
                    if not storage.open_task_indices(row["id"])]
        # One look per job directory: requests may have been submitted to several.
        by_place: dict[tuple[str, str, str], tuple[Config, list[int]]] = {}
        for rid in finished:
            config = StoredRequest(storage, rid).stored_config()
            if config is not None:
                key = (config.scheduler, config.host, config.ssh_dir)
                by_place.setdefault(key, (config, []))[1].append(rid)
        n_files = 0
        for config, ids in by_place.values():
            with open_scheduler(config) as scheduler:
                jobdir = scheduler.host.absolute(config.ssh_dir).rstrip("/")
                names = scheduler.host.list_dir(jobdir) or []
                doomed: list[str] = []
                for rid in ids:
                    mine = _leftover_files(storage, rid, names)
                    if mine and not doomed:  # the directory on a line of its own: it is long
                        print(f"in {scheduler.host.host}:{jobdir}")
                    if mine:
                        print(f"  request {rid} (finished): {len(mine)} files")
                    doomed += [f"{jobdir}/{name}" for name in mine]
                n_files += len(doomed)
                if doomed and args.yes:
                    for start in range(0, len(doomed), 200):  # bounded command lines
                        quoted = " ".join(shlex.quote(path) for path in doomed[start:start + 200])
                        scheduler.host.run(f"rm -rf -- {quoted}", timeout_s=120)
    if not n_files:
        print("nothing to clean: no finished request has files left")
    elif args.yes:
        print(f"deleted {n_files} files of finished requests")
    else:
        print(textwrap.fill(f"would delete {n_files} files of finished requests (their "
                            "results stay in the database); run again with --yes to delete "
                            "them", COLUMNS - 1))  # as the other notes: 79, not 80
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    config = as_config(args.config)
    if args.dbfile_given:
        config = config.replace(dbfile=args.dbfile)
    with _open_db(config.dbfile):
        pass
    done = cancel_request(args.id, config)
    print(done.describe())
    return 0 if done.jobs.error is None else 1


def _request_config(args: argparse.Namespace) -> Config:
    """The config of request ``args.id``: ``--config`` if given, else the one stored with it."""
    with _open_db(args.dbfile) as storage:
        config = StoredRequest(storage, args.id).stored_config()
        storage.count_tasks(args.id)  # an unknown id fails here, naming the database
    if args.config is not None:
        config = as_config(args.config).replace(dbfile=args.dbfile)
    if config is None:
        raise CliError(
            f"request {args.id} has no stored config (an older request): pass --config FILE"
        )
    return config


def cmd_rerun(args: argparse.Namespace) -> int:
    which = [w for w in RERUN_CHOICES if getattr(args, w)] or list(RERUN_DEFAULT)
    config = _request_config(args)
    indices = rerun(args.id, config, which)
    if not indices:
        print(f"request {args.id}: no {'/'.join(which)} tasks to run again")
        return 0
    print(f"request {args.id}: running {len(indices)} tasks again ({'/'.join(which)})",
          flush=True)
    if not args.wait:
        # This process's server stops when it exits, and the jobs need one: hand the
        # request to a `sheepdog serve` in the background, on the port they call back to.
        from .server import registry

        registry.stop(config.dbfile)
        with _open_db(config.dbfile) as storage:
            ports = sorted(_ports_to_serve(storage, [args.id]))
        serve = argparse.Namespace(dbfile=config.dbfile, timeout=None, request=[args.id],
                                   port=None, listen_address=None)
        _detach(serve, ports)
        print(textwrap.fill(f"wait for them with `sheepdog status {args.id} --wait`, or "
                            f"serve and wait here with `sheepdog attach {args.id}`", COLUMNS))
        return 0
    try:
        counts = wait_for_request(config.dbfile, args.id, verbose=True)
    except KeyboardInterrupt:
        # The jobs lose their server with this process: cancel them, as map does.
        print(f"sheepdog: interrupted: {stop_interrupted(args.id, config)}", file=sys.stderr,
              flush=True)
        return 130
    return 0 if counts.get(TaskState.DONE, 0) == sum(counts.values()) else 1


def cmd_attach(args: argparse.Namespace) -> int:
    from .attach import attach

    config = _request_config(args)
    try:
        attach(args.id, config, timeout_s=args.timeout)
    except KeyboardInterrupt:
        return 130  # attach said what became of the jobs
    args.wait = False
    cmd_results(args)
    with _open_db(args.dbfile) as storage:
        counts = storage.task_counts(args.id)
    for hint in _rerun_hints(args.id, counts):
        print(hint, file=sys.stderr)
    return 0 if counts.get(TaskState.DONE, 0) == sum(counts.values()) else 1


def _rerun_hints(request_id: int, counts: dict[str, int]) -> list[str]:
    """What to run for a request's tasks that ended without a result, 80 columns wide."""
    hints = []
    if counts.get(TaskState.CANCELLED):
        hints.append(f"request {request_id}: {counts[TaskState.CANCELLED]} tasks were "
                     f"cancelled; run them again with "
                     f"`sheepdog rerun {request_id} --cancelled --wait`")
    if counts.get(TaskState.ERROR):
        hints.append(f"request {request_id}: {counts[TaskState.ERROR]} tasks failed or were "
                     f"lost: `sheepdog errors {request_id}` says why; once that is fixed, run them "
                     f"again with `sheepdog rerun {request_id} --failed --wait`")
    return [textwrap.fill(hint, COLUMNS, break_long_words=False, break_on_hyphens=False)
            for hint in hints]


def _ports_to_serve(
    storage: Storage, only: Sequence[int] | None
) -> dict[int, tuple[str, str, list[int]]]:
    """Map each server port of the open requests to (scheme, listen address, request ids)."""
    from .server import listen_address

    ports: dict[int, tuple[str, str, list[int]]] = {}
    for row in storage.list_requests():
        rid = row["id"]
        if only and rid not in only:
            continue
        if row["state"] != RequestState.OPEN or not storage.open_task_indices(rid):
            continue
        latest = storage.latest_job(rid)
        if latest is None or latest.port is None:
            logger.warning("request %d has no recorded server port; it is not served", rid)
            continue
        url = urlsplit(latest.url or "http://x/")
        # Where the request's server listened; older records: where its URL's name resolves.
        address = latest.listen_address or listen_address(url.hostname or "localhost")
        ports.setdefault(latest.port, (url.scheme, address, []))[2].append(rid)
    return ports


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Server
    from .tunnel_keeper import TunnelKeeper

    with _open_db(args.dbfile) as storage:
        ports = _ports_to_serve(storage, args.request)
    if args.port is not None:
        scheme, address, _ = next(iter(ports.values()), ("http", "", []))
        all_ids = [rid for *_, ids in ports.values() for rid in ids]
        ports = {args.port: (scheme, address, all_ids)}
    if args.listen_address is not None:
        ports = {port: (scheme, args.listen_address, ids)
                 for port, (scheme, _, ids) in ports.items()}
    if not ports:
        print(f"nothing to serve: no request in {args.dbfile} has open tasks")
        return 0
    if args.detach:
        return _detach(args, sorted(ports))
    servers = []
    keeper: TunnelKeeper | None = None
    try:
        for port, (scheme, address, ids) in sorted(ports.items()):
            tls: dict[str, Any] = {}
            if scheme == "https":
                from .server.tls import certificate_for

                files = certificate_for(args.dbfile)
                tls = {"certfile": files.certfile, "keyfile": files.keyfile}
            servers.append((Server(port, None, args.dbfile, host=address, **tls), ids))
            print(f"serving requests {', '.join(map(str, ids))} on port {port} "
                  f"({scheme}, listening on {address})", flush=True)
        all_ids = [rid for *_, ids in ports.values() for rid in ids]
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        finished: set[int] = set()
        with Storage(args.dbfile) as storage:
            # Workers that use the tunnel reach nothing until a relay runs again.
            keeper = TunnelKeeper(storage, lambda line: print(line, flush=True))
            for server, ids in servers:
                for rid in ids:
                    keeper.add(rid, server)
            while not stop.is_set():
                for rid in all_ids:
                    if rid not in finished and not storage.open_task_indices(rid):
                        finished.add(rid)
                        keeper.drop(rid)
                        _delete_leftovers(storage, rid)
                keeper.keep()
                if len(finished) == len(all_ids):
                    print("every served request is finished", flush=True)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise CliError(f"requests still open after --timeout {args.timeout:g} s")
                for server, _ in servers:
                    server.ensure_running()
                stop.wait(1.0)
    finally:
        if keeper is not None:
            keeper.close()
        for server, _ in servers:
            server.stop()
    return 0


def _delete_leftovers(storage: Storage, request_id: int) -> None:
    """Delete the array tasks still queued for a finished request; they would wait on us."""
    request = StoredRequest(storage, request_id)
    try:
        found = request.stored_scheduler()
        if found is None:
            print(f"request {request_id} is finished; it has no stored config, so its "
                  "leftover array tasks (if any) were not deleted", flush=True)
            return
        with found[1] as scheduler:
            deletion = request.delete_leftovers(scheduler)
    except SheepdogError as exc:
        print(f"request {request_id} is finished; could not delete its leftover array "
              f"tasks: {exc}", flush=True)
        return
    what = "it never had a job" if deletion is None else deletion.describe()
    print(f"request {request_id} is finished; {what}", flush=True)


def _detach(args: argparse.Namespace, ports: list[int]) -> int:
    logfile = Path(args.dbfile).with_suffix(".serve.log")
    command = [sys.executable, "-m", "sheepdog", "serve", "--dbfile", args.dbfile]
    if args.timeout is not None:
        command += ["--timeout", str(args.timeout)]
    for rid in args.request or ():
        command += ["--request", str(rid)]
    if args.port is not None:
        command += ["--port", str(args.port)]
    if args.listen_address is not None:
        command += ["--listen-address", args.listen_address]
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    print(f"serving on port {', '.join(map(str, ports))} in the background: pid {proc.pid}")
    relative = os.path.relpath(logfile)  # shorter, where it is under this directory
    shown = logfile if relative.startswith("..") else relative
    print(textwrap.fill(f"log {shown}; stop it with: kill {proc.pid}", COLUMNS,
                        break_long_words=False, break_on_hyphens=False))
    return 0


def _open_in_browser(url: str) -> Path:
    """Open ``url`` in the browser through a private file, so no command line holds the token.

    As Jupyter does: the browser is started with a ``file://`` page (0600, in a
    0700 directory) that redirects to the URL; a browser's arguments are visible
    to every user of the machine. Returns the directory, for the caller to remove.
    """
    import html
    import tempfile
    import webbrowser

    folder = Path(tempfile.mkdtemp(prefix="sheepdog-dashboard-"))
    page = folder / "open.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f'<!doctype html><meta http-equiv="refresh" content="0;url={html.escape(url)}">'
                  f'<a href="{html.escape(url)}">open the sheepdog dashboard</a>')
    # In a thread: a text-mode browser could hold the call until it exits.
    threading.Thread(target=webbrowser.open, args=(page.as_uri(),), daemon=True).start()
    return folder


def cmd_dashboard(args: argparse.Namespace) -> int:
    import secrets

    from .dashboard.serve import LoopbackServer
    from .dashboard.views import TOKEN_PARAM, create_app

    _require_db(args.dbfile)
    token = secrets.token_urlsafe(24)
    app = create_app(args.dbfile, token)
    try:
        server = LoopbackServer(app, args.port)
    except OSError as exc:
        raise CliError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}; "
                       "pass another --port, or --port 0 for a free one") from exc
    url = f"http://127.0.0.1:{server.port}/?{TOKEN_PARAM}={token}"
    # The database's path is on the page: a long one would not fit 80 columns here.
    print("sheepdog dashboard: open this URL (on this machine; the token is its key):")
    print(f"  {url}")
    print("stop it with Ctrl-C", flush=True)
    folder = None if args.no_browser else _open_in_browser(url)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("sheepdog dashboard: stopped")  # Ctrl-C is how it is meant to end
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def cmd_worker_stub(args: argparse.Namespace) -> int:
    sys.stdout.write(stub_source())
    return 0


def _import_function(spec: str) -> Any:
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise CliError(f"the function must be given as module:function, not {spec!r}")
    sys.path.insert(0, os.getcwd())  # as `python -m` would, so a script next to you imports
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is not callable")
    return obj


def cmd_jobfile(args: argparse.Namespace) -> int:
    config = as_config(args.config) if args.config else Config(host="headnode")
    function = _import_function(args.function)
    try:
        values = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise CliError(f"--args is not valid JSON: {exc}") from exc
    if not isinstance(values, list):
        raise CliError("--args must be a JSON list, one element per task")
    values = [tuple(v) if isinstance(v, list) and args.unpack else v for v in values]
    payload = serialisation.serialise_function(function, None, mode=config.mode)
    serialisation.serialise_args(values)
    n = max(1, len(values))
    workers = array_size(config, n)
    scheme = "https" if getattr(config, "tls", False) else "http"
    # Without a fixed port the server picks one when it starts: show where it goes.
    url = f"{scheme}://{config.localhost}:{config.port if config.port else 'PORT'}/"
    # Without a connection "auto" cannot ask the head node: show Grid Engine's, its first choice.
    scheduler = scheduler_class(config.scheduler if config.scheduler != "auto" else "gridengine")
    scheduler.check_raw_options(config)
    text = job_file(
        url, f"/SSH_DIR/{key_file_name(1, PLACEHOLDER_SECRET)}", 1, n, config.shell,
        config.job_options(scheduler), array_size=workers, prologue=config.prologue,
        scheduler=scheduler, max_running=config.max_running,
    )
    sys.stdout.write(text)
    if config.scheduler == "auto":
        # Folded for an 80-column terminal (tests/e2e/test_terminal_e2e.py).
        print("sheepdog: scheduler 'auto': this is Grid Engine's job file;\n"
              "sheepdog: set scheduler to 'slurm' to see Slurm's", file=sys.stderr)
    print(
        f"sheepdog: {len(values)} tasks, {workers} array tasks, batch "
        f"{batch_size(config, n, workers)}, payload {len(payload)} bytes "
        f"({config.mode} mode)\nsheepdog: the key file's directory and the request id "
        "are placeholders",
        file=sys.stderr,
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    path = args.config
    if path is None and os.path.isfile(DOCTOR_DEFAULT_CONFIG):
        path = DOCTOR_DEFAULT_CONFIG
    if path is None:
        raise CliError("doctor needs the config of the cluster to check, as a JSON file: "
                       f"sheepdog doctor cluster.json (the keys of a sheepdog config); without "
                       f"one it reads ./{DOCTOR_DEFAULT_CONFIG}, which is not here")
    config = as_config(path)
    where = config.host or "localhost"
    print(textwrap.fill(f"sheepdog doctor: checking {where} (the probe job may wait in "
                        f"the queue for up to {args.timeout:g} s)", COLUMNS), flush=True)
    report = doctor(config, timeout_s=args.timeout, check=args.check,
                    on_check=lambda check: print(render_check(check), flush=True))
    print(textwrap.fill(report.summary(), COLUMNS))
    return 0 if report.ok else 1


def _openssh_of(path: str) -> tuple[Config, Any]:
    """The config at ``path`` and its OpenSSH remote, or None where paramiko does the work."""
    from .openssh import openssh_of
    from .scheduler import Scheduler, open_remote

    config = as_config(path)
    remote = open_remote(config, Scheduler)
    try:
        return config, openssh_of(remote)
    except SheepdogError:
        remote.close()
        raise


def cmd_login(args: argparse.Namespace) -> int:
    config, openssh = _openssh_of(args.config)
    if openssh is None:
        print(textwrap.fill(
            f"{config.host} took your key and asked for no code, so sheepdog logs in with "
            f"paramiko (ssh_client={config.ssh_client!r}) and keeps no login open; set "
            "ssh_client='openssh' to share one master connection", COLUMNS))
        return 0
    master = openssh.login_master(interactive=True)
    until = time.strftime("%H:%M", time.localtime(time.time() + (master.left_s or 0)))
    print(textwrap.fill(
        f"logged in to {openssh.target}: the master connection is open until {until} if "
        f"unused, and stays open {config.ssh_persist_s / 3600:g} h after its last use; "
        f"socket {master.path}", COLUMNS, break_on_hyphens=False))
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    config, openssh = _openssh_of(args.config)
    if openssh is None:
        print(textwrap.fill(f"{config.host}: sheepdog uses paramiko there, which keeps no "
                            "login open", COLUMNS))
        return 0
    if openssh.logout():
        print(textwrap.fill(f"closed the master connection to {openssh.target}", COLUMNS))
    else:
        print(textwrap.fill(f"no master connection to {openssh.target} was open", COLUMNS))
    return 0


# --- the parser -------------------------------------------------------------------------


def _add_dbfile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dbfile", default=None,
        help=f"the sheepdog database (default: ${DBFILE_ENV}, else {DEFAULT_DBFILE})",
    )


def _command(
    sub: Any, name: str, summary: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """A subcommand whose --help has a description and examples (argparse shows neither)."""
    example_text = "\n".join(f"  {line}" for line in examples)
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description,
        epilog=f"example{'s' if len(examples) > 1 else ''}:\n{example_text}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sheepdog`` command."""
    parser = argparse.ArgumentParser(
        prog="sheepdog",
        description="Look at sheepdog requests, fetch their results, cancel them, restart "
        "the server for pending work.",
        epilog=f"Commands that read a database take --dbfile, or ${DBFILE_ENV}; "
        "`sheepdog COMMAND --help` explains one command.",
    )
    parser.add_argument("--version", action="version", version=f"sheepdog {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(
        sub, "requests", "list requests with their task counts and states",
        "List every request in the database: when it was made, its state (running,\n"
        "finished or cancelled) and how many of its tasks are done, failed,\n"
        "cancelled, running and pending.",
        ["sheepdog requests", "SHEEPDOG_DBFILE=~/runs/sheepdog.sqlite sheepdog requests"],
    )
    _add_dbfile(p)
    p.set_defaults(run=cmd_requests)

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true",
                       help="wait until every task is finished, with a progress bar")
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="with --wait, give up after this long")

    p = _command(
        sub, "status", "one request's task counts and cluster jobs",
        "Show one request's state and task counts, and the Grid Engine or Slurm\n"
        "jobs that were submitted for it.",
        ["sheepdog status 2", "sheepdog status 2 --wait --timeout 600"],
    )
    p.add_argument("id", type=int, help="the request id")
    _add_dbfile(p)
    waiting(p)
    p.set_defaults(run=cmd_status)

    p = _command(
        sub, "results", "a request's arguments and results, one task per line",
        "Print a table of the request's tasks: task number (from 1), state,\n"
        "arguments and result. Only a done task has a result (None is a real None);\n"
        "a failed task shows its error, a pending or running one '-'.",
        ["sheepdog results 1", "sheepdog results 1 --json > results.json",
         "sheepdog results 1 | head"],
    )
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--json", action="store_true",
                   help="print JSON: [{index, args, result}]; values JSON cannot hold become "
                   '{"repr": ...}')
    _add_dbfile(p)
    waiting(p)
    p.set_defaults(run=cmd_results)

    p = _command(
        sub, "errors", "a request's failed tasks with their remote tracebacks",
        "Print every failed or cancelled task of a request: its number, its\n"
        "arguments, the exception and the traceback from the worker.",
        ["sheepdog errors 1"],
    )
    p.add_argument("id", type=int, help="the request id")
    _add_dbfile(p)
    p.set_defaults(run=cmd_errors)

    p = _command(
        sub, "logs", "the captured stdout and stderr of one task",
        "Print what one task wrote to stdout and stderr on its worker (each cut to\n"
        "the config's capture_bytes).",
        ["sheepdog logs 1 2", "sheepdog logs 1 2 --stream stderr"],
    )
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("index", type=int, help="the task index, from 1")
    p.add_argument("--stream", choices=("both", "stdout", "stderr"), default="both",
                   help="which output to show (default both, with headers)")
    _add_dbfile(p)
    p.set_defaults(run=cmd_logs)

    p = _command(
        sub, "clean", "delete the files that finished requests left in ssh_dir",
        "List the files that finished requests (no task pending or running) left in\n"
        "their job directory (ssh_dir, here or on the head node): job and key files,\n"
        "the server's address, the array tasks' .o/.e output. Nothing is deleted\n"
        "without --yes; results stay in the database, and open requests are not\n"
        "touched.",
        ["sheepdog clean", "sheepdog clean --yes"],
    )
    p.add_argument("--yes", action="store_true", help="delete the files listed")
    _add_dbfile(p)
    p.set_defaults(run=cmd_clean)

    p = _command(
        sub, "cancel", "delete a request's jobs and cancel its open tasks",
        "Cancel a request: its pending and running tasks become cancelled and its\n"
        "jobs are deleted on the head node, over SSH (qdel, or scancel on Slurm).",
        ["sheepdog cancel 2 --config cluster.json"],
    )
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="JSON config file naming the head node (the keys of a sheepdog config)")
    _add_dbfile(p)
    p.set_defaults(run=cmd_cancel)

    p = _command(
        sub, "rerun", "run a request's failed, lost or cancelled tasks again",
        "Run the tasks of a request that ended without a result again, under the\n"
        "same request id, as a new array job with the request's stored config.\n"
        "Earlier errors stay in each task's history; results are never rerun.\n"
        "Without --failed, --lost or --cancelled, all three are run again.",
        ["sheepdog rerun 2 --failed --wait", "sheepdog rerun 2"],
    )
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--failed", action="store_true",
                   help="every failed task: the function raised, the job was never "
                   "submitted, or the task was lost")
    p.add_argument("--lost", action="store_true",
                   help="only the failed tasks whose worker died or whose job was killed")
    p.add_argument("--cancelled", action="store_true", help="cancelled tasks")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON config file (default: the config stored with the request)")
    p.add_argument("--wait", action="store_true",
                   help="serve the jobs and wait for them, with a progress bar")
    _add_dbfile(p)
    p.set_defaults(run=cmd_rerun)

    p = _command(
        sub, "attach", "watch a request again from here: collect, resubmit, wait, print",
        "Bring a request back under watch from this process, after the process that\n"
        "submitted it went away (a laptop that slept, a closed terminal): serve its\n"
        "jobs again, collect the results its workers spooled while no server\n"
        "answered, resubmit the work whose jobs are gone, wait with a progress bar,\n"
        "then print its results as `sheepdog results` does. Exit status 1 unless\n"
        "every task is done.",
        ["sheepdog attach 2", "sheepdog attach 2 --json > results.json"],
    )
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON config file (default: the config stored with the request)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up waiting after this long (the jobs go on; attach again)")
    _add_dbfile(p)
    p.set_defaults(run=cmd_attach)

    p = _command(
        sub, "serve", "restart the server for requests with open tasks",
        "Restart the server for requests with open tasks, on the port their job\n"
        "files call back to, until they are finished. For a request whose workers\n"
        "use the tunnel (connect=\"tunnel\"), start the tunnel again too and write\n"
        "its address where they look for it.",
        ["sheepdog serve", "sheepdog serve --detach",
         "sheepdog serve --request 2 --timeout 3600"],
    )
    _add_dbfile(p)
    p.add_argument("--port", type=int, default=None,
                   help="serve on this port (default: the port each request was submitted with)")
    p.add_argument("--listen-address", default=None, metavar="ADDRESS",
                   help="listen on this address (default: where each request's server listened; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--request", type=int, action="append", metavar="ID",
                   help="serve only this request (repeatable)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background and print its pid")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop after this long even if tasks are open (exit status 1)")
    p.set_defaults(run=cmd_serve)

    p = _command(
        sub, "dashboard", "a web page of the requests, with each task's timeline",
        "Serve a read-only web page of the database's requests on this machine\n"
        "(127.0.0.1) and open it in the browser: their states and counts, and for\n"
        "one request its live progress, a timeline of its tasks by node and\n"
        "worker, throughput over time, failures grouped by error type with their\n"
        "tracebacks and output, and the commands to rerun or attach. The printed\n"
        "URL carries a random token; without it the page is refused. It reads a\n"
        "database that another process's map is writing. Ctrl-C stops it.",
        ["sheepdog dashboard", "sheepdog dashboard --dbfile runs/sheepdog.sqlite",
         "sheepdog dashboard --port 8765 --no-browser"],
    )
    _add_dbfile(p)
    p.add_argument("--port", type=int, default=0,
                   help="listen on this port of 127.0.0.1 (default 0: a free one)")
    p.add_argument("--no-browser", action="store_true",
                   help="only print the URL; do not open a browser")
    p.set_defaults(run=cmd_dashboard)

    p = _command(
        sub, "doctor", "check that maps can work with a cluster, and say what to fix",
        "Check, before a first map, everything a map needs: the SSH login, that a\n"
        "non-interactive login finds qsub or sbatch, the workers' Python (by running\n"
        "a one-task array job, which waits in the queue like any job), whether the\n"
        "execution nodes reach this machine directly and through the tunnel, and\n"
        "which way connect='auto' will pick. Each line says ok, warn, FAIL or\n"
        "skip, with a fix; exit status 1 when something stops maps from working.\n"
        "--check also compares modules: whether each imports on the node, and its\n"
        "version there against here. The config's database is not touched.",
        ["sheepdog doctor cluster.json", "sheepdog doctor cluster.json --timeout 900",
         "sheepdog doctor cluster.json --check numpy,scipy"],
    )
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                   help="JSON config file naming the head node (the keys of a sheepdog "
                   f"config; default ./{DOCTOR_DEFAULT_CONFIG})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long the probe job may take, queue wait included (default "
                   f"{DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--check", default=None, metavar="MODULE[,MODULE...]",
                   help="modules to import on the node and compare with this machine's "
                   "versions (a blocker if one does not import there)")
    p.set_defaults(run=cmd_doctor, dbfile=None)

    p = _command(
        sub, "login", "log in once: open the SSH master connection every process shares",
        "Open the OpenSSH master connection to the config's head node (ssh_client\n"
        "'openssh', or 'auto' on a host that asks for a code), asking for a code or\n"
        "a push in this terminal (or through SSH_ASKPASS), and say until when it\n"
        "lasts. Every sheepdog process then uses it without asking: map, attach,\n"
        "serve, doctor. See the docs page 'Clusters that ask for a code'.",
        ["sheepdog login cluster.json"],
    )
    p.add_argument("config", metavar="CONFIG", help="JSON config file naming the head node")
    p.set_defaults(run=cmd_login, dbfile=None)

    p = _command(
        sub, "logout", "close the SSH master connection that `sheepdog login` opened",
        "Close the OpenSSH master connection to the config's head node; the next\n"
        "process that needs it asks for a code again (or fails, without a terminal).",
        ["sheepdog logout cluster.json"],
    )
    p.add_argument("config", metavar="CONFIG", help="JSON config file naming the head node")
    p.set_defaults(run=cmd_logout, dbfile=None)

    p = _command(
        sub, "worker-stub", "print the worker stub that job files run",
        "Print the worker stub: the standard-library-only Python program that each\n"
        "array task runs, from sheepdog_worker-<digest>.py beside its job file. It is\n"
        "the same file whatever the request; nothing is read or submitted.",
        ["sheepdog worker-stub > sheepdog_worker.py"],
    )
    p.set_defaults(run=cmd_worker_stub, dbfile=None)

    p = _command(
        sub, "jobfile", "render the job file for a function and arguments, without submitting",
        "Import module:function (from the current directory first), check that it and\n"
        "the JSON arguments can be sent, and print the job file sheepdog would submit,\n"
        "with a placeholder secret and request id. Nothing is submitted.",
        ["sheepdog jobfile mymodule:simulate --args '[1, 2, 3]' --config cluster.json"],
    )
    p.add_argument("function", help="the function as module:function (imported from here)")
    p.add_argument("--args", default="[]", metavar="JSON",
                   help="JSON list with one argument per task (default [])")
    p.add_argument("--unpack", action="store_true",
                   help="pass each JSON list argument as positional arguments, as a tuple would")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON config file")
    p.set_defaults(run=cmd_jobfile, dbfile=None)
    return parser


def _fail(message: str) -> NoReturn:
    print(f"sheepdog: error: {message}", file=sys.stderr)
    sys.exit(1)


def _closed_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as Unix tools do."""
    # Python would complain again when it flushes stdout at exit; point it at /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sheepdog`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.dbfile is None and args.run not in (cmd_worker_stub, cmd_jobfile, cmd_doctor,
                                                cmd_login, cmd_logout):
        args.dbfile = os.environ.get(DBFILE_ENV) or None
    args.dbfile_given = args.dbfile is not None
    if args.dbfile is None:
        args.dbfile = DEFAULT_DBFILE
    try:
        status: int = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()
    except (CliError, SheepdogError, OSError) as exc:
        # One line, but all of it: a failed remote command's stderr is the useful part.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        _fail("; ".join(lines) or type(exc).__name__)
    except KeyboardInterrupt:
        print("sheepdog: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
