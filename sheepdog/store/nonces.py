"""Signed calls answered once per nonce: the effect and its answer committed together.

Part of :class:`~sheepdog.store.queue.Queue`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable

from ..errors import StorageError
from .db import Database

__all__ = ["NONCE_PRUNE_EVERY_S", "NonceReusedError", "Nonces"]

#: A connection forgets nonces that left the clock window at most this often: forgetting
#: them on every call cost a statement per call, and keeping them longer only keeps more.
NONCE_PRUNE_EVERY_S = 10.0


class NonceReusedError(StorageError):
    """A nonce already recorded for another call of the same request."""


class _NonceRecorded(Exception):
    """Raised inside ``answer_once``'s transaction to roll it back: the nonce has an answer."""


class Nonces(Database):
    """Run each signed call's effect once per nonce, and answer its retries from the record."""

    #: When this connection last forgot nonces that left the clock window.
    _nonces_pruned_at = 0.0

    def answer_once(
        self,
        request_id: int,
        nonce: str,
        stamp: int,
        signature: str,
        window_s: float,
        effect: Callable[[sqlite3.Connection], bytes],
    ) -> tuple[bytes, bool]:
        """Run a signed call's ``effect`` once per nonce; return ``(answer, replayed)``.

        In one write transaction: run ``effect`` and record its answer with the
        nonce, so that the effect and its answer are committed together. A nonce
        recorded already (a retry or a replay racing its first call past the
        caller's ``CallAuth.seen`` check) rolls the effect back and returns the
        recorded answer (``replayed`` True: changing nothing). If ``effect`` raises,
        nothing is recorded. The same nonce with another signature raises
        NonceReusedError. Every ``NONCE_PRUNE_EVERY_S`` the transaction also forgets
        nonces whose time left the clock window (the server refuses those calls anyway).
        """
        try:
            with self._write() as conn:
                now = time.time()
                if now - self._nonces_pruned_at >= NONCE_PRUNE_EVERY_S:
                    conn.execute("DELETE FROM nonces WHERE stamp < ?", (now - window_s,))
                    self._nonces_pruned_at = now
                answer = effect(conn)
                try:
                    conn.execute(
                        "INSERT INTO nonces (request_id, nonce, stamp, signature, answer)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (request_id, nonce, stamp, signature, answer),
                    )
                except sqlite3.IntegrityError as exc:
                    if "UNIQUE" not in str(exc):
                        raise
                    raise _NonceRecorded from None  # _write rolls the effect back
                return answer, False
        except _NonceRecorded:
            pass
        with self._lock:
            row = self.conn.execute(
                "SELECT signature, answer FROM nonces WHERE request_id = ? AND nonce = ?",
                (request_id, nonce),
            ).fetchone()
        if row is None or str(row[0]) != signature:
            raise NonceReusedError(
                f"nonce {nonce} was already used by another call of request {request_id}"
            )
        return bytes(row[1]), True
