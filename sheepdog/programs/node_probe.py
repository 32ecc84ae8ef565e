"""What the probe job of ``sheepdog doctor`` finds on an execution node, written as JSON.

sheepdog.doctor pastes this text into the probe job's file, after the job head and
before the worker stub's ``module_version`` and one call, ``probe(OUT_PATH, TARGETS,
TIMEOUT_S[, MODULES])``, run by the workers' Python. It prints nothing, but writes one
JSON file. Python 2 must parse it too, so that a Python that is too old is reported
rather than a SyntaxError; standard library only.
"""
import importlib  # noqa: F401 - the worker stub's module_version, pasted after this, uses it
import json
import os
import platform
import socket
import sys

MYPY = False
if MYPY:  # type checkers only; the job file has module_version from the worker stub
    from typing import Any, Dict, List, Sequence  # novermin  # noqa: F401 - named in type comments

    def module_version(name):
        # type: (str) -> List[Any]
        pass


def reach(address, timeout):
    # type: (str, float) -> Dict[str, Any]
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    try:
        conn = socket.create_connection((host, int(port)), timeout)
    except Exception as e:  # noqa: BLE001 - any failure is the answer, reported
        return {"ok": False, "said": "cannot connect to %s: %s: %s" % (
            address, type(e).__name__, e)}
    try:
        conn.settimeout(timeout)
        conn.sendall(("GET /api/v1/health HTTP/1.0\r\nHost: %s\r\n\r\n" % host).encode("ascii"))
        data = b""
        while len(data) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except Exception as e:  # noqa: BLE001 - any failure is the answer, reported
        return {"ok": False, "said": "connected to %s, but no answer: %s: %s" % (
            address, type(e).__name__, e)}
    finally:
        conn.close()
    status = data.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in status + " " or b'"ok"' not in data:
        return {"ok": False, "said": "%s answered, but not as sheepdog's server: %r" % (
            address, status[:100])}
    return {"ok": True, "said": "%s answered" % address}


def probe(out_path, targets, timeout, modules=()):
    # type: (str, Sequence[Sequence[str]], float, Sequence[str]) -> None
    found = {
        "modules": dict((name, module_version(name)) for name in modules),
        "python": platform.python_version(),
        "version": list(sys.version_info[:3]),
        "implementation": platform.python_implementation().lower(),
        "executable": sys.executable,
        "node": socket.gethostname(),
        "reach": dict((name, reach(address, timeout)) for name, address in targets),
    }
    tmp = out_path + ".part"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(found))
    os.rename(tmp, out_path)
