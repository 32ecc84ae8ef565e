"""Which machines sheepdog runs on: a Python without Unix facilities is told to use WSL2."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import sheepdog
from sheepdog.errors import PlatformError
from sheepdog.platforms import SUPPORTED, missing_facilities, require_unix

ROOT = Path(__file__).resolve().parents[1]


def test_this_unix_has_everything() -> None:
    assert missing_facilities() == []
    require_unix()


def test_import_sheepdog_without_fcntl_fails_at_once_naming_wsl2(tmp_path: Path) -> None:
    """As on Windows' own Python, where gunicorn's fcntl does not exist."""
    code = ("import sys\nsys.modules['fcntl'] = None  # import fcntl raises ImportError\n"
            "try:\n    import sheepdog\nexcept ImportError as e:\n"
            "    print(type(e).__name__, e.missing, sys.modules.get('gunicorn'))\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    first, message = done.stdout.splitlines()
    assert first == "PlatformError ['fcntl'] None"  # before anything else was imported
    assert message.startswith(f"sheepdog runs on {SUPPORTED}: this Python")
    assert "lacks fcntl" in message and "WSL2" in message and "gunicorn" in message


def test_a_python_without_fork_is_named_too() -> None:
    windows_os = types.SimpleNamespace(**{k: v for k, v in vars(os).items()
                                          if k not in ("fork", "killpg", "setsid")})
    with pytest.raises(PlatformError, match="lacks os.fork, os.killpg, os.setsid") as caught:
        require_unix(windows_os)  # type: ignore[arg-type]
    assert caught.value.missing == ["os.fork", "os.killpg", "os.setsid"]
    assert isinstance(caught.value, (ImportError, sheepdog.SheepdogError))


@pytest.mark.parametrize("name", ["README.md", "docs/getting-started.rst"])
def test_the_supported_platforms_are_stated(name: str) -> None:
    text = " ".join((ROOT / name).read_text(encoding="utf-8").split())
    assert "Linux, macOS" in text and "WSL2" in text, name
