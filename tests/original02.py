"""A real Sheepdog 0.2.3 database, made by the published 0.2.3 package itself.

0.2.3 is installed into a virtualenv of its own (``benchmarks._original``, as
``ci/bench`` does); a script run there stores requests with 0.2.3's
``Storage``, starts 0.2.3's server and runs 0.2.3's ``Client`` for each task,
so the rows are exactly what a 0.2.3 user's ``sheepdog.sqlite`` holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks._original import ensure_original_venv, original_env

__all__ = [
    "BUILD_TIMEOUT_S", "EXPECTED", "build_original_database", "copy_database",
    "read_with_original", "run_original",
]

BUILD_TIMEOUT_S = 180

#: What the database holds: request id -> (args, results with None for no result).
EXPECTED: dict[int, tuple[list[Any], list[Any]]] = {
    1: ([(1, 2), (3, 4), (5, "x")], [3, 7, None]),  # task 3 raised TypeError under 0.2.3
    2: ([[10, 20]], [30]),  # 0.2.3 unpacked lists too
    3: ([(7, 8)], [None]),  # submitted, never run: no result, no error
}

_BUILD = r'''
import json, socket, sys, time
from sheepdog import serialisation
from sheepdog.client import Client
from sheepdog.server import Server
from sheepdog.storage import Storage

def add(a, b):
    return a + b

dbfile = sys.argv[1]
storage = Storage(dbfile)
storage.initdb()
run = [[(1, 2), (3, 4), (5, "x")], [[10, 20]]]
new = lambda args: storage.new_request(serialisation.serialise_function(add),
                                       serialisation.serialise_namespace({}),
                                       serialisation.serialise_args(args))
ids = [new(args) for args in run]
never = new([(7, 8)])
server = Server(None, "password", dbfile)
try:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("the 0.2.3 server did not listen within 30 s")
            time.sleep(0.05)
    for rid, args in zip(ids, run):
        for i in range(1, len(args) + 1):
            Client("http://127.0.0.1:%d/" % server.port, "password", rid, i).go()
finally:
    server.stop()
print(json.dumps({"ids": ids + [never]}))
'''

_READ = r'''
import json, sys
from sheepdog import get_results, get_errors
rid = int(sys.argv[2])
print(json.dumps({"results": [r for _, r in get_results(rid, sys.argv[1], block=False)],
                  "errors": [e for _, e in get_errors(rid, sys.argv[1])]}))
'''


def run_original(script: str, *args: str, cwd: Path) -> str:
    """Run ``script`` with 0.2.3's Python (installing it first if needed); return stdout."""
    python = ensure_original_venv()
    done = subprocess.run(
        [str(python), "-c", script, *args], cwd=cwd, env=original_env(),
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, f"Sheepdog 0.2.3 failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_original_database(path: Path) -> None:
    """Write a 0.2.3 database holding :data:`EXPECTED` to ``path``."""
    out = run_original(_BUILD, str(path), cwd=path.parent)
    ids = json.loads(out.strip().splitlines()[-1])["ids"]
    assert ids == sorted(EXPECTED), ids


def read_with_original(path: Path, request_id: int) -> dict[str, Any]:
    """What 0.2.3's own get_results/get_errors read from ``path`` (results, error texts)."""
    out = run_original(_READ, str(path), str(request_id), cwd=path.parent)
    return dict(json.loads(out.strip().splitlines()[-1]))


def copy_database(source: Path, target: Path) -> Path:
    """Copy a 0.2.3 database file (it has no WAL or journal beside it) to ``target``."""
    shutil.copyfile(source, target)
    return target
