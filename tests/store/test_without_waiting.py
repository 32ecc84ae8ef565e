"""``without_waiting``: a call that would wait for a lock raises WouldWait and changes nothing."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from sheepdog.poll import poll_until
from sheepdog.storage import Storage
from sheepdog.store.db import BUSY_TIMEOUT_MS, WouldWait, without_waiting


@pytest.fixture
def dbfile(tmp_path: Path) -> str:
    return str(tmp_path / "db.sqlite")


def _request(db: Storage) -> int:
    return db.new_request(b"F", None, [pickle.dumps(i) for i in range(3)])


def _nonces(dbfile: str) -> int:
    with Storage(dbfile) as db:
        return int(db.conn.execute("SELECT count(*) FROM nonces").fetchone()[0])


def _answer_once(db: Storage, rid: int, nonce: str) -> tuple[bytes, bool]:
    return db.answer_once(rid, nonce, int(time.time()), "sig-" + nonce, 300.0,
                          lambda conn: b"answer")


def busy_timeout(db: Storage) -> int:
    return int(db.conn.execute("PRAGMA busy_timeout").fetchone()[0])


def test_a_write_raises_at_once_while_another_process_writes(dbfile: str) -> None:
    with Storage(dbfile) as db:
        rid = _request(db)
        # Another process's writer: its own connection, no write queue shared with ours.
        other = sqlite3.connect(dbfile, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(WouldWait), without_waiting():
                _answer_once(db, rid, "n1")
            assert time.monotonic() - start < 1.0  # not SQLite's busy timeout
            assert not db.conn.in_transaction
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert _nonces(dbfile) == 0  # nothing was recorded
        # Once the lock is free, the same call goes through without waiting.
        with without_waiting():
            assert _answer_once(db, rid, "n1") == (b"answer", False)
        assert _nonces(dbfile) == 1


def test_a_write_raises_while_another_thread_of_this_process_writes(dbfile: str) -> None:
    with Storage(dbfile) as first, Storage(dbfile) as second:
        rid = _request(first)
        inside, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> bytes:
            inside.set()
            release.wait(10)
            return b"held"

        writer = threading.Thread(target=lambda: first.answer_once(
            rid, "n0", int(time.time()), "sig-n0", 300.0, hold))
        writer.start()
        try:
            assert inside.wait(10)
            with pytest.raises(WouldWait), without_waiting():
                _answer_once(second, rid, "n1")
        finally:
            release.set()
            writer.join(10)
        assert _nonces(dbfile) == 1  # the holder's only


def test_a_waiting_call_outside_without_waiting_still_waits_for_the_lock(dbfile: str) -> None:
    """The busy timeout comes back once a connection leaves without_waiting."""
    with Storage(dbfile) as db:
        rid = _request(db)
        with without_waiting():
            assert busy_timeout(db) == 0
        assert busy_timeout(db) == BUSY_TIMEOUT_MS
        other = sqlite3.connect(dbfile, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        done: list[tuple[bytes, bool]] = []
        writer = threading.Thread(target=lambda: done.append(_answer_once(db, rid, "n1")))
        writer.start()
        try:
            # It waits (SQLite's busy handler), rather than failing, while the lock is held.
            assert not poll_until(lambda: bool(done), timeout_s=0.5)
        finally:
            other.execute("COMMIT")
            other.close()
        writer.join(10)
        assert done == [(b"answer", False)]


def test_an_error_that_is_not_a_lock_is_not_turned_into_would_wait(dbfile: str) -> None:
    with Storage(dbfile) as db, pytest.raises(sqlite3.OperationalError), without_waiting():
        db.conn.execute("SELECT * FROM no_such_table")
