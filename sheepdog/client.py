"""Sheepdog's clientside code: the worker stub, importable as ``sheepdog.client``.

The stub (``worker_stub/sheepdog_worker.py``) is standard-library-only code
pasted into every job file, as workers do not have sheepdog installed. This
module loads that same file so that ``sheepdog.client.Client`` (the original's
documented name) and the stub's helpers can be used and tested locally.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

from ._stubfile import stub_path

__all__ = ["Client", "stub"]

_MODULE_NAME = "sheepdog._worker_stub"


def _load_stub() -> ModuleType:
    loaded = sys.modules.get(_MODULE_NAME)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, stub_path())
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
        raise ImportError(f"cannot load the worker stub from {stub_path()}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


#: The worker stub loaded as a module (its helpers: parse_memory, memory_limit, ...).
stub: ModuleType = _load_stub()
#: The worker: ``Client(url, password, request_id, job_index, **options).go()``.
Client: Any = stub.Client
