"""New requests and the result cache, and the request row as the library and server read it.

Part of :class:`~sheepdog.store.records.Records`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from ..blobs import parse_ref
from ..errors import UnknownRequestError
from .db import DEFAULT_SETTINGS, Database

__all__ = ["CallAuth", "Requests", "content_digest"]


def content_digest(data: bytes) -> str:
    """The digest that identifies a function payload or an argument pickle in the cache."""
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=256)
def _settings(text: str) -> Mapping[str, Any]:
    """A request's stored settings over the defaults, parsed once per distinct text."""
    # Settings never change after new_request, and every call of the server needs them.
    return MappingProxyType({**DEFAULT_SETTINGS, **json.loads(text)})


@dataclass(frozen=True)
class CallAuth:
    """What the server needs to check and carry out one signed call, read in one query."""

    secret: str
    n_tasks: int
    state: str
    settings: Mapping[str, Any]
    #: ``(signature, answer)`` recorded for the call's nonce, or None if unseen.
    seen: tuple[str, bytes] | None

    @property
    def info(self) -> tuple[str, int, int]:
        """``(state, n_tasks, max_attempts)``, as the ``*_in`` methods take it."""
        return self.state, self.n_tasks, int(self.settings["max_attempts"])


class Requests(Database):
    """Store requests and their tasks, fill them from the cache, and read the request row."""

    def new_request(
        self,
        serialised_function: bytes,
        serialised_namespace: bytes | None,
        args_list: Sequence[bytes],
        *,
        secret: str | None = None,
        settings: dict[str, Any] | None = None,
        label: str | None = None,
        func_digest: str | None = None,
        args_digests: Sequence[str] | None = None,
        digest_args: bool = False,
    ) -> int:
        """Store a request and one pending task per serialised argument; return its id.

        Task indices count from 1. ``secret`` (64 hex characters) is generated when
        not given. ``settings`` are merged over ``DEFAULT_SETTINGS``. The digests
        (of the function's payload, and of each argument) let later requests take
        these results from the cache (:meth:`fill_from_cache`). ``digest_args``
        instead of ``args_digests``: hash each argument here, a large one on the
        threads that write it (one pass over its bytes, several at once).
        """
        if secret is None:
            secret = secrets.token_hex(32)
        elif len(secret) < 32:
            raise ValueError("a request secret needs at least 128 bits (32 hex characters)")
        else:
            bytes.fromhex(secret)  # fail here, not when the first worker calls
        merged = {**DEFAULT_SETTINGS, **(settings or {})}
        values = list(args_list)
        digests = list(args_digests) if args_digests is not None else [None] * len(values)
        if len(digests) != len(values):
            raise ValueError(f"{len(digests)} argument digests for {len(values)} arguments")
        # Blobs first: a row never names a blob that is not durable yet.
        args = self.store_values(values, digests)
        if digest_args and args_digests is None:
            digests = [parse_ref(a)[0] if isinstance(a, str) else content_digest(a) for a in args]
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO requests (created, func, ns, secret, n_tasks, settings, label,"
                " func_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    serialised_function,
                    serialised_namespace,
                    secret,
                    len(args),
                    json.dumps(merged),
                    label,
                    func_digest,
                ),
            )
            request_id = cursor.lastrowid
            assert request_id is not None
            conn.executemany(
                "INSERT INTO tasks (request_id, idx, args, args_digest) VALUES (?, ?, ?, ?)",
                ((request_id, i, a, d) for i, (a, d) in enumerate(zip(args, digests), start=1)),
            )
        return int(request_id)

    def fill_from_cache(self, request_id: int) -> int:
        """Finish the request's pending tasks whose result is already stored; return how many.

        A task matches an earlier task with a result (never a failure) of a
        request whose function has the same payload digest, and the same
        argument digest. Such tasks are done at once, marked ``cached``.
        """
        now = time.time()
        filled = 0
        with self._write() as conn:
            row = conn.execute(
                "SELECT func_digest FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise UnknownRequestError(request_id, self.dbfile)
            if row[0] is None:
                return 0
            pending = conn.execute(
                "SELECT idx, args_digest FROM tasks WHERE request_id = ? AND state = 'pending'"
                " AND args_digest IS NOT NULL ORDER BY idx",
                (request_id,),
            ).fetchall()
            for idx, digest in pending:
                found = conn.execute(
                    "SELECT t.result FROM tasks t JOIN requests r ON r.id = t.request_id"
                    " WHERE t.args_digest = ? AND t.state = 'done' AND r.func_digest = ?"
                    " AND t.request_id != ? LIMIT 1",
                    (digest, row[0], request_id),
                ).fetchone()
                if found is None:
                    continue
                conn.execute(
                    "UPDATE tasks SET state = 'done', result = ?, cached = 1, finished = ?"
                    " WHERE request_id = ? AND idx = ?",
                    (found[0], now, request_id, idx),
                )
                filled += 1
        return filled

    def count_cached(self, request_id: int) -> int:
        """Return how many of the request's tasks took their result from the cache."""
        self._request_row(request_id, "id")
        with self._lock:
            row = self.conn.execute(
                "SELECT count(*) FROM tasks WHERE request_id = ? AND cached = 1", (request_id,)
            ).fetchone()
        return int(row[0])

    def get_secret(self, request_id: int) -> str:
        """Return the request's secret (64 hex characters)."""
        return str(self._request_row(request_id, "secret")[0])

    def get_settings(self, request_id: int) -> dict[str, Any]:
        """Return the request's settings, defaults filled in."""
        (text,) = self._request_row(request_id, "settings")
        return {**DEFAULT_SETTINGS, **json.loads(text)}

    def call_auth(self, request_id: int, nonce: str | None = None) -> CallAuth:
        """Read the request's secret, size, state and settings, and what ``nonce`` got, at once.

        One query per call: the server reads the request row here and nowhere else
        (the ``*_in`` methods take ``CallAuth.info``).
        """
        with self._lock:
            row = self.conn.execute(
                "SELECT r.secret, r.n_tasks, r.state, r.settings, n.signature, n.answer"
                " FROM requests r LEFT JOIN nonces n ON n.request_id = r.id AND n.nonce = ?"
                " WHERE r.id = ?",
                (nonce, request_id),
            ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        secret, n_tasks, state, text, signature, answer = row
        seen = None if signature is None else (str(signature), bytes(answer))
        return CallAuth(str(secret), int(n_tasks), str(state), _settings(text), seen)

    def get_function(self, request_id: int) -> tuple[bytes, bytes | None]:
        """Return the request's serialised function and namespace."""
        func, ns = self._request_row(request_id, "func, ns")
        return bytes(func), (None if ns is None else bytes(ns))

    def get_request_state(self, request_id: int) -> str:
        """Return ``"open"`` or ``"cancelled"``."""
        return str(self._request_row(request_id, "state")[0])

    def list_requests(self) -> list[dict[str, Any]]:
        """Return every request's id, created time, task count, state and label."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT id, created, n_tasks, state, label FROM requests ORDER BY id"
            ).fetchall()
        keys = ("id", "created", "n_tasks", "state", "label")
        return [dict(zip(keys, row)) for row in rows]
