"""The ``sheepdog`` command: look at requests, fetch results, cancel, restart the server.

``sheepdog --help`` lists the commands and ``sheepdog COMMAND --help`` explains
one. Every command that reads a database takes ``--dbfile`` (default
``./sheepdog.sqlite``, as the library). Errors are one line on stderr with exit
status 1; a wrong command line exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import __version__, serialisation
from ._api import (
    array_size,
    batch_size,
    cancel_request,
    delete_jobs,
    get_errors,
    get_output,
    get_results,
    open_deployer,
    served,
    stored_config,
)
from ._progress import format_counts
from .config import Config, as_config
from .errors import SheepdogError
from .job_file import job_file, key_file_name, stub_source
from .storage import OPEN_STATES, Storage
from .watch import wait_for_request

__all__ = ["main"]

logger = logging.getLogger(__name__)

DEFAULT_DBFILE = "./sheepdog.sqlite"
#: Names the key file in a job file that ``sheepdog jobfile`` renders: never a real secret.
PLACEHOLDER_SECRET = "0" * 64


class CliError(Exception):
    """A problem to report as one line and exit status 1."""


def _open_db(dbfile: str) -> Storage:
    if not os.path.isfile(dbfile):
        raise CliError(f"no sheepdog database at {dbfile}; pass --dbfile PATH")
    return Storage(dbfile)


def _value_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return {"repr": repr(value)}
    return value


def _ago(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


# --- commands -----------------------------------------------------------------------


def _unserved_note(storage: Storage, request_id: int, dbfile: str) -> str | None:
    """A line saying that no server serves an open request, and what to run; else None."""
    if not storage.open_task_indices(request_id) or served(storage, request_id) is not False:
        return None
    return (
        f"request {request_id} has open tasks but no server is serving it: its array tasks "
        f"cannot report. Run `sheepdog serve --dbfile {dbfile}`, or `sheepdog cancel "
        f"{request_id} --config FILE --dbfile {dbfile}`"
    )


def cmd_requests(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile) as storage:
        rows = storage.list_requests()
        if not rows:
            print(f"no requests in {args.dbfile}")
            return 0
        notes = []
        print(f"{'ID':>5}  {'CREATED':19}  {'STATE':9}  {'TASKS':>6}  {'DONE':>6}  "
              f"{'FAILED':>6}  {'RUNNING':>7}  {'PENDING':>7}  LABEL")
        for row in rows:
            c = storage.task_counts(row["id"])
            state = row["state"]
            if state == "open":
                state = "running" if any(c[s] for s in OPEN_STATES) else "finished"
            print(
                f"{row['id']:>5}  {_ago(row['created']):19}  {state:9}  {row['n_tasks']:>6}  "
                f"{c['done']:>6}  {c['error'] + c['cancelled']:>6}  {c['leased']:>7}  "
                f"{c['pending']:>7}  {row['label'] or ''}"
            )
            if row["state"] == "open":
                note = _unserved_note(storage, row["id"], args.dbfile)
                if note is not None:
                    notes.append(note)
        for note in notes:
            print(note)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _open_db(args.dbfile).close()  # a mistyped --dbfile must not become an empty database
    if args.wait:
        wait_for_request(args.dbfile, args.id, verbose=True, timeout_s=args.timeout)
    with _open_db(args.dbfile) as storage:
        counts = storage.task_counts(args.id)
        total = storage.count_tasks(args.id)
        state = storage.get_request_state(args.id)
        jobs = storage.get_jobs(args.id)
        note = _unserved_note(storage, args.id, args.dbfile) if state == "open" else None
    print(f"request {args.id}: {state}, {format_counts(counts, total)}")
    for job in jobs:
        port = job["info"].get("port")
        where = f", server port {port}" if port else ""
        print(f"  job {job['job_id']}: {job['array_size']} array tasks, submitted "
              f"{_ago(job['submitted'])}{where}")
    if note is not None:
        print(note)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    _open_db(args.dbfile).close()  # a mistyped --dbfile must not become an empty database
    if args.wait:
        wait_for_request(args.dbfile, args.id, verbose=True, timeout_s=args.timeout)
    with _open_db(args.dbfile) as storage:
        storage.count_tasks(args.id)  # an unknown id fails here, clearly
    results = get_results(args.id, args.dbfile, block=False)
    if args.json:
        data = [
            {"index": i, "args": _jsonable(arg), "result": _jsonable(result)}
            for i, (arg, result) in enumerate(results, start=1)
        ]
        json.dump(data, sys.stdout, indent=1)
        print()
    else:
        for i, (arg, result) in enumerate(results, start=1):
            print(f"{i}\t{_value_text(arg)}\t{_value_text(result)}")
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile):
        pass
    errors = get_errors(args.id, args.dbfile)
    if not errors:
        print(f"request {args.id}: no errors")
    for arg, error in errors:
        print(f"--- task {error.task_index} ({error.kind}), args {_value_text(arg)}")
        print(str(error))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _open_db(args.dbfile):
        pass
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


def cmd_cancel(args: argparse.Namespace) -> int:
    config = as_config(args.config)
    if args.dbfile_given:
        config = config.replace(dbfile=args.dbfile)
    with _open_db(config.dbfile):
        pass
    done = cancel_request(args.id, config)
    print(done.describe())
    return 0 if done.jobs.error is None else 1


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
        if row["state"] != "open" or not storage.open_task_indices(rid):
            continue
        jobs = storage.get_jobs(rid)
        if not jobs or "port" not in jobs[-1]["info"]:
            logger.warning("request %d has no recorded server port; it is not served", rid)
            continue
        info = jobs[-1]["info"]
        url = urlsplit(str(info.get("url", "http://x/")))
        # Where the request's server listened; older records: where its URL's name resolves.
        address = info.get("listen_address") or listen_address(url.hostname or "localhost")
        ports.setdefault(int(info["port"]), (url.scheme, str(address), []))[2].append(rid)
    return ports


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Server

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
    try:
        for port, (scheme, address, ids) in sorted(ports.items()):
            tls: dict[str, Any] = {}
            if scheme == "https":
                from ._tls import certificate_for

                files = certificate_for(args.dbfile)
                tls = {"certfile": files.certfile, "keyfile": files.keyfile}
            servers.append(Server(port, None, args.dbfile, host=address, **tls))
            print(f"serving requests {', '.join(map(str, ids))} on port {port} "
                  f"({scheme}, listening on {address})", flush=True)
        all_ids = [rid for *_, ids in ports.values() for rid in ids]
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        finished: set[int] = set()
        with Storage(args.dbfile) as storage:
            while not stop.is_set():
                for rid in all_ids:
                    if rid not in finished and not storage.open_task_indices(rid):
                        finished.add(rid)
                        _delete_leftovers(storage, rid)
                if len(finished) == len(all_ids):
                    print("every served request is finished", flush=True)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise CliError(f"requests still open after --timeout {args.timeout:g} s")
                for server in servers:
                    if not server.alive:
                        server.restart()
                stop.wait(1.0)
    finally:
        for server in servers:
            server.stop()
    return 0


def _delete_leftovers(storage: Storage, request_id: int) -> None:
    """Delete the array tasks still queued for a finished request; they would wait on us."""
    config = stored_config(storage, request_id)
    if config is None:
        print(f"request {request_id} is finished; it has no stored config, so its leftover "
              "array tasks (if any) were not deleted", flush=True)
        return
    try:
        with open_deployer(config) as deployer:
            deletion = delete_jobs(deployer, storage.dbfile, request_id)
    except SheepdogError as exc:
        print(f"request {request_id} is finished; could not delete its leftover array "
              f"tasks: {exc}", flush=True)
        return
    print(f"request {request_id} is finished; {deletion.describe()}", flush=True)


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
    print(f"serving on port {', '.join(map(str, ports))} in the background: pid {proc.pid}, "
          f"log {logfile}; stop it with: kill {proc.pid}")
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
    ge_opts = list(config.ge_opts or ()) + config.resource_directives()
    text = job_file(
        url, f"/SSH_DIR/{key_file_name(1, PLACEHOLDER_SECRET)}", 1, n, config.shell, ge_opts,
        array_size=workers, prologue=config.prologue,
    )
    sys.stdout.write(text)
    print(
        f"sheepdog: {len(values)} tasks, {workers} array tasks, batch "
        f"{batch_size(config, n, workers)}, function payload {len(payload)} bytes "
        f"({config.mode} mode); the key file's directory and the request id are placeholders",
        file=sys.stderr,
    )
    return 0


# --- the parser -------------------------------------------------------------------------


def _add_dbfile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dbfile", default=None,
        help=f"the sheepdog database (default {DEFAULT_DBFILE})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sheepdog`` command."""
    parser = argparse.ArgumentParser(
        prog="sheepdog",
        description="Look at sheepdog requests, fetch their results, cancel them, restart "
        "the server for pending work.",
    )
    parser.add_argument("--version", action="version", version=f"sheepdog {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("requests", help="list requests with their task counts and states")
    _add_dbfile(p)
    p.set_defaults(run=cmd_requests)

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true",
                       help="wait until every task is finished, with a progress bar")
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="with --wait, give up after this long")

    p = sub.add_parser("status", help="one request's task counts and Grid Engine jobs")
    p.add_argument("id", type=int, help="the request id")
    _add_dbfile(p)
    waiting(p)
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("results", help="a request's arguments and results, one task per line")
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--json", action="store_true",
                   help="print JSON: [{index, args, result}]; values JSON cannot hold become "
                   '{"repr": ...}')
    _add_dbfile(p)
    waiting(p)
    p.set_defaults(run=cmd_results)

    p = sub.add_parser("errors", help="a request's failed tasks with their remote tracebacks")
    p.add_argument("id", type=int, help="the request id")
    _add_dbfile(p)
    p.set_defaults(run=cmd_errors)

    p = sub.add_parser("logs", help="the captured stdout and stderr of one task")
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("index", type=int, help="the task index, from 1")
    p.add_argument("--stream", choices=("both", "stdout", "stderr"), default="both",
                   help="which output to show (default both, with headers)")
    _add_dbfile(p)
    p.set_defaults(run=cmd_logs)

    p = sub.add_parser("cancel", help="qdel a request's jobs and cancel its open tasks")
    p.add_argument("id", type=int, help="the request id")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="JSON config file naming the head node (as `ci/cluster up` writes)")
    _add_dbfile(p)
    p.set_defaults(run=cmd_cancel)

    p = sub.add_parser(
        "serve", help="restart the server for requests with open tasks",
        description="Restart the server for requests with open tasks, on the port their job "
        "files call back to, until they are finished.",
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

    p = sub.add_parser("worker-stub", help="print the worker stub that goes into job files")
    p.set_defaults(run=cmd_worker_stub, dbfile=None)

    p = sub.add_parser(
        "jobfile", help="render the job file for a function and arguments, without submitting",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sheepdog`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.dbfile_given = args.dbfile is not None
    if args.dbfile is None:
        args.dbfile = DEFAULT_DBFILE
    try:
        status: int = args.run(args)
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
