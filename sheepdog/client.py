"""Sheepdog's clientside code: the worker stub, importable as ``sheepdog.client``.

The stub (``worker_stub/sheepdog_worker.py``) is standard-library-only code
that every job file runs, as workers do not have sheepdog installed. This
module is the original's public name for it, so that ``sheepdog.client.Client``
(the original's documented name) and the stub's helpers can be used and tested
locally; the stub is found and loaded in ``sheepdog.stubfile``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .stubfile import load_stub

__all__ = ["Client", "stub"]

#: The worker stub loaded as a module (its helpers: load_function, tasks_to_lease, ...).
stub: ModuleType = load_stub()
#: The worker: ``Client(url, password, request_id, job_index, **options).go()``.
Client: Any = stub.Client
