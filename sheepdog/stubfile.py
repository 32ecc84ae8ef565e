"""The worker stub's one home: where its file is, its text, and the module loaded from it.

The stub (``worker_stub/sheepdog_worker.py``, installed as
``sheepdog/_stub/sheepdog_worker.py``) is standard-library-only code that every
job file runs, as workers do not have sheepdog installed: its text, read here,
is copied beside the job files once per version (``sheepdog.job_file.put_stub``).
``sheepdog.client`` (the original's public name), the schedulers' exit messages
and the serialiser's local decoding use the same file through this module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_stub", "stub_path", "stub_source"]

#: The name the loaded stub has in ``sys.modules``, so that it is loaded once.
_MODULE_NAME = "sheepdog._worker_stub"


def stub_path() -> Path:
    """Return the path of the worker stub's source file, installed or in a source checkout."""
    package = Path(__file__).parent
    installed = package / "_stub" / "sheepdog_worker.py"
    if installed.is_file():
        return installed
    checkout = package.parent / "worker_stub" / "sheepdog_worker.py"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        f"the worker stub is neither at {installed} (installed wheel) nor at {checkout} "
        "(source checkout): reinstall sheepdog"
    )


def stub_source() -> str:
    """Return the worker stub's source text, as copied beside the job files that run it."""
    return stub_path().read_text(encoding="utf-8")


def load_stub() -> ModuleType:
    """Return the worker stub as a module (``Client``, its exit statuses, its helpers).

    It is loaded once per process, as ``sheepdog._worker_stub``.
    """
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
