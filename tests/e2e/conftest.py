"""Fixtures for the end-to-end tests on a real Grid Engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def config(cluster: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The cluster's sheepdog config, with a database of the test's own."""
    return dict(cluster, dbfile=str(tmp_path / "sheepdog.sqlite"))
