"""Which machines sheepdog runs on: Linux and macOS, and Windows through WSL2.

Its server runs under gunicorn, which forks workers and locks files with
``fcntl``; sheepdog stops its servers and local jobs by process group. A Python
without these (Windows' own) would fail deep inside the first map, so importing
this module, which ``import sheepdog`` does first, checks for them and says what
to do.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from .errors import PlatformError

__all__ = ["SUPPORTED", "WSL_URL", "missing_facilities", "require_unix"]

#: What the docs and the error say sheepdog runs on.
SUPPORTED = "Linux, macOS, or Windows through WSL2"
WSL_URL = "https://learn.microsoft.com/windows/wsl/install"

#: The modules and ``os`` functions that gunicorn and sheepdog's process handling need.
_MODULES = ("fcntl",)
_OS_FUNCTIONS = ("fork", "killpg", "setsid")


def missing_facilities(os_module: ModuleType = os) -> list[str]:
    """The Unix facilities this Python lacks, by name (empty on Linux and macOS)."""
    missing = []
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    missing += [f"os.{name}" for name in _OS_FUNCTIONS if not hasattr(os_module, name)]
    return missing


def require_unix(os_module: ModuleType = os) -> None:
    """Raise PlatformError, naming what is missing and WSL2, unless this is a Unix."""
    missing = missing_facilities(os_module)
    if missing:
        raise PlatformError(
            f"sheepdog runs on {SUPPORTED}: this Python ({sys.platform}) lacks "
            f"{', '.join(missing)}, which its server (gunicorn) and its process handling "
            f"need. On Windows, install WSL2 ({WSL_URL}) and run sheepdog inside it",
            missing=missing,
        )


require_unix()
