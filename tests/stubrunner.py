"""Run the worker stub's decoding section in a separate Python, as a worker would.

One subprocess serves many requests over its stdin/stdout (length-prefixed pickles), so
property tests can send hundreds of examples without starting a process for each. The
subprocess runs with ``-I`` from an empty directory, so neither sheepdog nor the tests
are importable there: whatever a function needs must come inside its payload.
"""

from __future__ import annotations

import os
import pickle
import selectors
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sheepdog.job_file import job_file, key_file_name, stub_source, write_job_file

#: The Python that plays the worker: Debian's, if present (same minor version here).
WORKER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

def write_job(
    directory: Path, url: str, secret: str, request_id: int, n_args: int,
    ge_opts: tuple[str, ...] | list[str] = (), **options: Any,
) -> Path:
    """Render and write a job file and the key file it names, as a deployment does remotely."""
    key = Path(directory).absolute() / key_file_name(request_id, secret)
    text = job_file(url, str(key), request_id, n_args, WORKER_PYTHON, list(ge_opts), **options)
    return write_job_file(text, directory, request_id, secret)


# Python 3.6 syntax: this runs under old worker Pythons too.
_SERVE = r'''
import os, struct, sys

def _serve():
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's prints must not corrupt the reply channel
    source = sys.stdin.buffer
    while True:
        head = source.read(8)
        if len(head) < 8:
            return
        request = pickle.loads(source.read(struct.unpack(">Q", head)[0]))
        try:
            reply = ("ok", _handle(request))
        except Exception as exc:
            reply = ("error", type(exc).__name__, str(exc))
        data = pickle.dumps(reply, 2)
        channel.write(struct.pack(">Q", len(data)) + data)
        channel.flush()

def _handle(request):
    if request[0] == "echo":
        return [dump_value(load_value(data), request[2]) for data in request[1]]
    payload, arguments = request[1], request[2]
    function = load_function(payload)
    protocol = result_protocol(payload)
    results = []
    for data in arguments:
        value = load_value(data)
        try:
            result = function(*value) if isinstance(value, tuple) else function(value)
            results.append(("ok", dump_value(result, protocol)))
        except Exception as exc:
            results.append(("raised", type(exc).__name__, str(exc)))
    return results

_serve()
'''


class StubError(Exception):
    """The stub's decoder raised: carries the exception's type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class StubProcess:
    """A long-lived worker Python running the stub's decoder; close() it when done."""

    def __init__(self, python: str = WORKER_PYTHON, timeout_s: float = 60.0) -> None:
        self.python = python
        self.timeout_s = timeout_s
        self._cwd = tempfile.TemporaryDirectory()
        self._stderr = tempfile.TemporaryFile()
        script = stub_source() + _SERVE
        self._process = subprocess.Popen(
            [python, "-I", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=self._cwd.name,
        )

    def call(self, payload: bytes, arguments: list[bytes]) -> list[tuple[Any, ...]]:
        """Load the function and call it on each pickled argument.

        Returns ``("ok", pickled result)`` or ``("raised", type name, message)`` per
        argument; raises :class:`StubError` if loading the function failed.
        """
        result: list[tuple[Any, ...]] = self._request(("call", payload, arguments))
        return result

    def echo(self, values: list[bytes], protocol: int) -> list[bytes]:
        """Unpickle each value in the stub and pickle it back with ``protocol``."""
        result: list[bytes] = self._request(("echo", values, protocol))
        return result

    def _request(self, request: tuple[Any, ...]) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        data = pickle.dumps(request, 4)
        self._process.stdin.write(struct.pack(">Q", len(data)) + data)
        self._process.stdin.flush()
        head = self._read(8)
        reply = pickle.loads(self._read(struct.unpack(">Q", head)[0]))
        if reply[0] == "error":
            raise StubError(reply[1], reply[2])
        return reply[1]

    def _read(self, n: int) -> bytes:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        chunks = []
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while n > 0:
                if not selector.select(self.timeout_s):
                    raise TimeoutError(f"the stub gave no answer in {self.timeout_s} s")
                chunk = os.read(fd, n)
                if not chunk:
                    self._stderr.seek(0)
                    stderr = self._stderr.read().decode(errors="replace")
                    raise RuntimeError(f"the stub process exited; its stderr:\n{stderr}")
                chunks.append(chunk)
                n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Stop the subprocess (EOF on stdin, then kill after a bounded wait)."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._stderr.close()
        self._cwd.cleanup()
