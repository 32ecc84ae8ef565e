"""Where the worker stub's source is: installed beside the package, or in a source checkout."""

from __future__ import annotations

from pathlib import Path

__all__ = ["stub_path", "stub_source"]


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
    """Return the worker stub's source text, as pasted into every job file."""
    return stub_path().read_text(encoding="utf-8")
