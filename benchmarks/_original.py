"""The published Sheepdog 0.2.3, installed unattended into a virtualenv of its own.

The benchmarks compare against it, and ``tests/test_upgrade_02.py`` builds a
real 0.2.3 database with it. It is never installed into our environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks._report import ROOT

__all__ = ["ORIGINAL_VENV", "ensure_original_venv", "original_env"]

ORIGINAL_VENV = ROOT / ".venv-sheepdog02"
#: Bound on each pip step (PyPI is reachable but may be slow).
PIP_TIMEOUT_S = 600


def ensure_original_venv(venv: Path = ORIGINAL_VENV) -> Path:
    """Create ``venv`` with Sheepdog 0.2.3 if it is not there yet; return its python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import sheepdog.server, tornado"]
    if python.exists() and subprocess.run(
        check, capture_output=True, env=original_env(), timeout=PIP_TIMEOUT_S
    ).returncode == 0:
        return python
    print(f"[sheepdog-0.2.3] installing Sheepdog 0.2.3 into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                   timeout=PIP_TIMEOUT_S)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Its paramiko==1.13.0 pin needs pycrypto, which does not build on Python 3.11.
    subprocess.run([*pip, "--no-deps", "Sheepdog==0.2.3"], check=True, timeout=PIP_TIMEOUT_S)
    subprocess.run([*pip, "flask", "tornado", "paramiko"], check=True, timeout=PIP_TIMEOUT_S)
    subprocess.run(check, check=True, env=original_env(), timeout=PIP_TIMEOUT_S)
    return python


def original_env() -> dict[str, str]:
    """Our environment without PYTHONPATH, so that 0.2.3's python imports 0.2.3, not us."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
