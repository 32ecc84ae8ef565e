"""Large arguments and results on a real cluster: binary bodies, files beside the database."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

import sheepdog
from sheepdog.blobs import INLINE_MAX_BYTES
from sheepdog.executor import Executor
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

SIZE = 3 * 1024 * 1024  # well above INLINE_MAX_BYTES, and quick to move


def digest_and_echo(data: bytes, factor: int) -> tuple[str, bytes]:
    import hashlib

    return hashlib.sha256(data).hexdigest(), data[::-1] * factor


def test_large_arguments_and_results_travel_as_blobs(config: dict[str, Any]) -> None:
    values = [os.urandom(SIZE), os.urandom(SIZE // 2)]
    args = [(values[0], 1), (values[1], 2), (b"small", 1)]
    results = sheepdog.map(digest_and_echo, args, config, verbose=False, errors="raise")
    assert results == [
        (hashlib.sha256(values[0]).hexdigest(), values[0][::-1]),
        (hashlib.sha256(values[1]).hexdigest(), values[1][::-1] * 2),
        (hashlib.sha256(b"small").hexdigest(), b"llams"),
    ]
    dbfile = Path(config["dbfile"])
    blob_dir = Path(f"{dbfile}.blobs")
    blob_sizes = sorted(p.stat().st_size for p in blob_dir.iterdir())
    assert len(blob_sizes) == 4  # two arguments, two results; the small ones are inline
    assert all(size > INLINE_MAX_BYTES for size in blob_sizes)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in blob_dir.iterdir())
    assert blob_dir.stat().st_mode & 0o777 == 0o700
    assert dbfile.stat().st_size < SIZE  # the values are beside it, not in it
    with Storage(dbfile) as db:
        (request,) = db.list_requests()
        stored = db.get_results(request["id"])
    assert pickle.loads(stored[1][1]) == results[1]


def test_the_executor_moves_large_values(config: dict[str, Any]) -> None:
    value = os.urandom(SIZE)
    with Executor(config) as pool:
        future = pool.submit(digest_and_echo, value, 2)
        assert future.result(timeout=300) == (hashlib.sha256(value).hexdigest(), value[::-1] * 2)
