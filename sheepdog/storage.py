"""SQLite storage of requests, their tasks, results, errors and Grid Engine jobs.

The database is the queue between the library and the workers. Every write
that decides who owns a task runs inside ``BEGIN IMMEDIATE`` so that many
server processes can share one file: a task is never leased to two workers,
and the first result for a task wins.

Durability: the connection uses WAL with ``synchronous=FULL`` by default, and
every write commits before the method returns, so a result that the server has
acknowledged survives the server being killed (and, with ``FULL``, a power cut).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any, Callable

from sheepdog import _upgrade02
from sheepdog._poll import poll_until
from sheepdog.blobs import INLINE_MAX_BYTES, BlobStore, is_ref, make_ref
from sheepdog.errors import StorageError, UnknownRequestError, UnknownTaskError

try:
    import fcntl
except ImportError:  # Windows: no write queue, SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DB_FILE_MODE",
    "DEFAULT_SETTINGS",
    "OPEN_STATES",
    "RERUN_CHOICES",
    "SCHEMA_VERSION",
    "CallAuth",
    "Lease",
    "NonceReusedError",
    "Storage",
    "content_digest",
]

logger = logging.getLogger(__name__)

#: Settings a request gets unless ``new_request(settings=...)`` says otherwise.
DEFAULT_SETTINGS: dict[str, Any] = {
    "lease_s": 120.0,
    "heartbeat_s": 30.0,
    "task_timeout_s": None,
    "batch": 1,
    "capture_bytes": 65536,
    "max_attempts": 3,
}

#: One lease's heartbeat; found through the tasks_by_lease index, one row per token.
RENEW_SQL = (
    "UPDATE tasks SET lease_expires = ?, worker = ? WHERE request_id = ?"
    " AND lease = ? AND state = 'leased'"
)

#: Task states that may still change; the others are final.
OPEN_STATES = ("pending", "leased")

#: The database and its sibling files hold every request's secret, payload and result.
DB_FILE_MODE = 0o600
#: Files SQLite (and our write queue) keep beside the database, named by these suffixes.
SIBLING_SUFFIXES = ("-wal", "-shm", "-journal", "-writers")

#: Threads that write a new request's large arguments to the blob store.
BLOB_WRITERS = 4
BUSY_TIMEOUT_MS = 30_000  # as the original's 0.2.3: many writers wait rather than fail
#: A connection forgets nonces that left the clock window at most this often: forgetting
#: them on every call cost a statement per call, and keeping them longer only keeps more.
NONCE_PRUNE_EVERY_S = 10.0

#: One lock per database and process, taken before the write queue's flock: threads of
#: one process (a gunicorn worker's) wait on it without polling, so at most one of them
#: polls the flock. Keyed by the write queue's path; rebuilt in a forked child, where a
#: lock held by another thread at the fork would never be released.
_writer_locks: dict[str, threading.RLock] = {}
_writer_locks_guard = threading.Lock()


def _forget_writer_locks() -> None:
    global _writer_locks_guard
    _writer_locks.clear()
    _writer_locks_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer_locks)


def _writer_lock(path: str) -> threading.RLock:
    with _writer_locks_guard:
        lock = _writer_locks.get(path)
        if lock is None:
            lock = _writer_locks[path] = threading.RLock()
        return lock


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """Put the database in WAL mode; return the journal mode SQLite reports.

    Two connections switching a new database at the same moment: SQLite answers one
    "database is locked" at once, without its busy handler (seen with two maps started
    together in one process). Ask again within the busy timeout; a lasting lock still fails.
    """
    answer: list[str] = []

    def switched() -> bool:
        try:
            answer.append(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            return False
        return True

    if not poll_until(switched, timeout_s=BUSY_TIMEOUT_MS / 1000, interval_s=0.01,
                      max_interval_s=0.5):
        raise sqlite3.OperationalError(
            f"database is locked: could not switch to WAL mode in {BUSY_TIMEOUT_MS / 1000:g} s"
        )
    return answer[-1]


_SCHEMA_FILE = Path(__file__).with_name("schema.sql")
_V1_TABLES = {"requests", "tasks", "jobs"}


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    original = _upgrade02.is_original(conn)
    if original:
        _upgrade02.set_aside(conn)
    existing = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    clash = (existing & _V1_TABLES) - {"sqlite_sequence"}
    if clash:
        # A version-0 file with our table names but not 0.2.3's layout was made by hand
        # or by another program: its columns differ, and guessing would corrupt it.
        raise StorageError(
            f"the database already has tables {sorted(clash)} but no schema version, and not "
            "Sheepdog 0.2.3's tables (which are migrated): it was made by an older sheepdog "
            "or another program; use a new dbfile"
        )
    # executescript would commit the caller's transaction first: run statements one by one.
    for statement in _statements(_SCHEMA_FILE.read_text(encoding="utf-8")):
        conn.execute(statement)
    if original:
        _upgrade02.copy_into_schema(conn, DEFAULT_SETTINGS)


_V2_STATEMENTS = (
    # renew() finds each heartbeat's tasks by lease token: without this index every
    # token scanned the request's tasks while holding the write lock.
    "CREATE INDEX IF NOT EXISTS tasks_by_lease ON tasks (request_id, lease)",
    # Each signed call's nonce, for the clock window, with the answer it got: a call
    # seen again (a worker's retry or a replay) is answered from here, changing nothing.
    """CREATE TABLE IF NOT EXISTS nonces (
        request_id  INTEGER NOT NULL REFERENCES requests (id),
        nonce       TEXT    NOT NULL,
        stamp       INTEGER NOT NULL,
        signature   TEXT    NOT NULL,
        answer      BLOB    NOT NULL,
        PRIMARY KEY (request_id, nonce)
    )""",
    "CREATE INDEX IF NOT EXISTS nonces_by_stamp ON nonces (stamp)",
)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    for statement in _V2_STATEMENTS:
        conn.execute(statement)


_V3_STATEMENTS = (
    # Every time a task reaches a final state it gets the next number here, so that a
    # reader (the Executor) asks only for what finished since it last looked, instead
    # of re-reading every task's result each time the count moves. A trigger keeps it
    # in one place, whichever code path finishes the task (and ties in time do not
    # matter: the numbers are distinct).
    """CREATE TABLE IF NOT EXISTS finished_log (
        seq         INTEGER PRIMARY KEY,
        request_id  INTEGER NOT NULL,
        idx         INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS finished_log_by_request ON finished_log (request_id, seq)",
    # Tasks that finished before this version are in the log too, in finishing order.
    "INSERT INTO finished_log (request_id, idx) SELECT request_id, idx FROM tasks"
    " WHERE state NOT IN ('pending', 'leased') ORDER BY finished, request_id, idx",
    """CREATE TRIGGER IF NOT EXISTS tasks_finished AFTER UPDATE OF state ON tasks
    WHEN OLD.state IN ('pending', 'leased') AND NEW.state NOT IN ('pending', 'leased')
    BEGIN
        INSERT INTO finished_log (request_id, idx) VALUES (NEW.request_id, NEW.idx);
    END""",
    # What a task's earlier runs ended with, kept when a rerun makes it pending again.
    """CREATE TABLE IF NOT EXISTS task_history (
        request_id  INTEGER NOT NULL REFERENCES requests (id),
        idx         INTEGER NOT NULL,
        run         INTEGER NOT NULL,
        state       TEXT    NOT NULL,
        error       TEXT,
        host        TEXT,
        stdout      TEXT,
        stderr      TEXT,
        attempts    INTEGER NOT NULL,
        finished    REAL,
        PRIMARY KEY (request_id, idx, run)
    )""",
    # The result cache: a task is known by its function's payload digest (on the
    # request) and its argument pickle's digest. Only results are indexed, so a
    # failure is never found.
    "ALTER TABLE requests ADD COLUMN func_digest TEXT",
    "ALTER TABLE tasks ADD COLUMN args_digest TEXT",
    "ALTER TABLE tasks ADD COLUMN cached INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS tasks_by_args_digest ON tasks (args_digest)"
    " WHERE state = 'done' AND args_digest IS NOT NULL",
)


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    for statement in _V3_STATEMENTS:
        conn.execute(statement)


#: Migration steps: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migrate_to_1, _migrate_to_2, _migrate_to_3,
]

#: Error kinds of tasks whose worker or job went away: a worker that stopped renewing
#: its lease, a job that left the queue with work undone, a job in Grid Engine's error
#: state.
LOST_KINDS = ("lost", "job_lost", "job_error")
_LOST_SQL = ", ".join(f"'{kind}'" for kind in LOST_KINDS)

#: What :meth:`Storage.rerun_tasks` may choose, each as a condition on a task's row:
#: ``failed`` is an error of any other kind (the function raised, a timeout, a job
#: never submitted or never schedulable).
RERUN_CHOICES: dict[str, str] = {
    "failed": f"(state = 'error' AND coalesce(json_extract(error, '$.kind'), '')"
              f" NOT IN ({_LOST_SQL}))",
    "lost": f"(state = 'error' AND json_extract(error, '$.kind') IN ({_LOST_SQL}))",
    "cancelled": "state = 'cancelled'",
}
SCHEMA_VERSION = len(MIGRATIONS)


def content_digest(data: bytes) -> str:
    """The digest that identifies a function payload or an argument pickle in the cache."""
    return hashlib.sha256(data).hexdigest()


class NonceReusedError(StorageError):
    """A nonce already recorded for another call of the same request."""


class _NonceRecorded(Exception):
    """Raised inside ``answer_once``'s transaction to roll it back: the nonce has an answer."""


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


@dataclass(frozen=True)
class Lease:
    """One task handed to a worker until ``expires`` (unix time)."""

    index: int
    attempt: int
    lease: str
    #: The pickled argument, or a blob reference (``sha256:<hex>:<size>``) when it is large.
    args: bytes | str
    expires: float


def _make_private(dbfile: str) -> None:
    """Create the database file owner-only if it is missing; tighten it and its siblings.

    SQLite creates its -wal, -shm and -journal files with the database file's mode, so a
    0600 database keeps them 0600 too; files left wider by an older version are narrowed.
    """
    try:
        os.close(os.open(dbfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DB_FILE_MODE))
    except FileExistsError:
        pass
    except OSError:
        return  # sqlite3.connect says why, with the path
    for path in (dbfile, *(dbfile + suffix for suffix in SIBLING_SUFFIXES)):
        try:
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o077:
                os.chmod(path, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(
                "%s is readable by others and cannot be made private (%s); it holds request "
                "secrets: chmod 600 it",
                path,
                exc,
            )


def _error_json(error: object) -> str:
    if isinstance(error, dict):
        return json.dumps(error)
    text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
    return json.dumps({"type": "Error", "message": text, "traceback": text})


def _load_error(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"type": "Error", "message": text, "traceback": ""}
    return value if isinstance(value, dict) else {"type": "Error", "message": str(value)}


def error_text(error: dict[str, Any]) -> str:
    """The text of a stored error dict: its traceback, else ``"Type: message"``."""
    traceback = str(error.get("traceback") or "")
    if traceback.strip():
        return traceback
    return f"{error.get('type') or 'Error'}: {error.get('message') or ''}"


class Storage:
    """One connection to a sheepdog SQLite database; usable as a context manager.

    ``Storage()`` opens ``./sheepdog.sqlite`` as the original did, creating and
    migrating the schema. ``init=False`` skips that for callers (the server)
    that know the schema is current. ``create=False`` is for readers: a file
    that does not exist is a :class:`StorageError` saying so, and nothing is
    created. The object may be shared between threads: calls are serialised on
    one lock.
    """

    def __init__(
        self,
        dbfile: str | Path = "./sheepdog.sqlite",
        *,
        init: bool = True,
        synchronous: str = "FULL",
        write_queue: bool = True,
        create: bool = True,
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.dbfile = str(dbfile)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._queue: IO[bytes] | None = None
        self._queue_path = ""
        self._nonces_pruned_at = 0.0
        in_memory = self.dbfile in ("", ":memory:")
        #: Values longer than INLINE_MAX_BYTES live here; an in-memory database keeps all inline.
        self.blobs: BlobStore | None = None if in_memory else BlobStore(self.dbfile + ".blobs")
        if not create and not in_memory and not Path(self.dbfile).is_file():
            raise StorageError(
                f"no sheepdog database at {self.dbfile}: the file does not exist; "
                "pass the dbfile the request was made with"
            )
        if not in_memory:
            _make_private(self.dbfile)  # for a reader, it exists: only its mode is narrowed
        try:
            # mode=rw: a reader never creates a file, even if it vanishes after the check.
            uri = not create and not in_memory
            target = f"{Path(self.dbfile).resolve().as_uri()}?mode=rw" if uri else self.dbfile
            self._conn = sqlite3.connect(
                target,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
                uri=uri,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the database {self.dbfile}: {exc}") from exc
        if write_queue and fcntl is not None and self.dbfile != ":memory:":
            try:
                fd = os.open(f"{self.dbfile}-writers", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                             DB_FILE_MODE)
                self._queue = os.fdopen(fd, "ab")
                self._queue_path = os.path.realpath(f"{self.dbfile}-writers")
            except OSError as exc:
                logger.debug("no write queue for %s: %s", self.dbfile, exc)
        if init:
            try:
                self.initdb()
            except BaseException:
                self.close()
                raise

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._queue is not None:
                self._queue.close()
                self._queue = None

    def __del__(self) -> None:
        # Servers keep one Storage per thread for the thread's life; close it with them.
        try:
            self.close()
        except Exception:  # noqa: S110 - nothing useful to do in a finaliser
            pass

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Storage({self.dbfile!r})"

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection; raises StorageError once closed."""
        if self._conn is None:
            raise StorageError(f"this Storage for {self.dbfile} is closed; open a new one")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run a block in one ``BEGIN IMMEDIATE`` transaction, committed on success."""
        with self._lock:
            conn = self.conn
            local = None if self._queue is None else _writer_lock(self._queue_path)
            # Past the busy timeout, go on: SQLite's own locking still keeps us safe.
            ours = local is not None and local.acquire(timeout=BUSY_TIMEOUT_MS / 1000)
            queued = False
            try:
                queued = self._queue_for_writing()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                if queued and self._queue is not None:
                    fcntl.flock(self._queue, fcntl.LOCK_UN)
                if ours and local is not None:
                    local.release()

    def _queue_for_writing(self) -> bool:
        """Wait in a kernel queue (flock) for our turn to write; True if we hold it.

        SQLite's own busy handler sleeps 1, 2, 5... 100 ms between retries, which
        caps throughput when many gunicorn threads commit at once; a flock wakes the
        next writer as soon as the last one is done. It only orders writers: if it
        cannot be had within the busy timeout, SQLite's locking still keeps us safe.
        """
        if self._queue is None:
            return False
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
            except OSError:  # e.g. a file system without flock
                return False

    def initdb(self) -> None:
        """Create the tables, or migrate an older database to the current schema."""
        with self._lock:
            conn = self.conn
            try:
                backup = self._backup_original(conn)
                mode = _switch_to_wal(conn)
                if str(mode).lower() != "wal":
                    logger.warning("%s: SQLite refused WAL mode (%s)", self.dbfile, mode)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self.dbfile} has schema version {version}, newer than this "
                        f"sheepdog's {SCHEMA_VERSION}: upgrade sheepdog to open it"
                    )
                while version < SCHEMA_VERSION:
                    with self._write() as c:
                        # Re-read inside the lock: another process may have migrated.
                        version = c.execute("PRAGMA user_version").fetchone()[0]
                        if version >= SCHEMA_VERSION:
                            break
                        logger.info(
                            "%s: migrating schema %d -> %d", self.dbfile, version, version + 1
                        )
                        MIGRATIONS[version](c)
                        c.execute(f"PRAGMA user_version = {version + 1}")
                    version += 1
            except sqlite3.Error as exc:
                raise StorageError(f"cannot initialise the database {self.dbfile}: {exc}") from exc
        if backup is not None:
            warnings.warn(
                f"{self.dbfile} was a Sheepdog 0.2.3 database: it now has sheepdog's schema, "
                f"its requests kept under their ids; the original is copied to {backup} "
                "(see docs/upgrading.rst)",
                UserWarning,
                stacklevel=2,
            )

    def _backup_original(self, conn: sqlite3.Connection) -> Path | None:
        """Copy a Sheepdog 0.2.3 database beside itself before it is migrated."""
        if self.dbfile == ":memory:" or conn.execute("PRAGMA user_version").fetchone()[0] != 0:
            return None
        if not _upgrade02.is_original(conn):
            return None
        # Before WAL mode is set, so that the copy is the file 0.2.3 wrote.
        return _upgrade02.backup(conn, self.dbfile)

    def schema_version(self) -> int:
        """Return the database's ``PRAGMA user_version``."""
        with self._lock:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # -- requests ------------------------------------------------------------------

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
    ) -> int:
        """Store a request and one pending task per serialised argument; return its id.

        Task indices count from 1. ``secret`` (64 hex characters) is generated when
        not given. ``settings`` are merged over ``DEFAULT_SETTINGS``. The digests
        (of the function's payload, and of each argument) let later requests take
        these results from the cache (:meth:`fill_from_cache`).
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

    def _request_row(self, request_id: int, columns: str) -> tuple[Any, ...]:
        with self._lock:
            row = self.conn.execute(
                f"SELECT {columns} FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        return tuple(row)

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

    # -- the seed's per-task API ----------------------------------------------------

    def get_details(self, request_id: int, job_index: int) -> tuple[bytes, bytes | None, bytes]:
        """Return ``(function, namespace, args)`` for task ``job_index`` (from 1)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT r.func, r.ns, t.args FROM requests r JOIN tasks t ON t.request_id = r.id"
                " WHERE r.id = ? AND t.idx = ?",
                (request_id, job_index),
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)
        func, ns, args = row
        return bytes(func), (None if ns is None else bytes(ns)), self.load_value(args)

    def store_value(self, value: bytes, digest: str | None = None) -> bytes | str:
        """Return what a column keeps for ``value``: itself, or a blob reference when large.

        ``digest`` is the value's SHA-256 (:func:`content_digest`) if the caller has it.
        """
        if self.blobs is None or len(value) <= INLINE_MAX_BYTES:
            return value
        return self.blobs.put(value, digest)

    def store_values(
        self, values: Sequence[bytes], digests: Sequence[str | None]
    ) -> list[bytes | str]:
        """:meth:`store_value` for many values, writing large ones on a few threads.

        Hashing, writing and fsync release the GIL: several blobs are written at once.
        """
        large = sum(1 for v in values if len(v) > INLINE_MAX_BYTES)
        if large < 2 or self.blobs is None:
            return [self.store_value(v, d) for v, d in zip(values, digests)]
        with ThreadPoolExecutor(max_workers=BLOB_WRITERS, thread_name_prefix="blobs") as pool:
            return list(pool.map(self.store_value, values, digests))

    def load_value(self, stored: bytes | str) -> bytes:
        """Return the bytes a column's value stands for, reading a blob reference's file."""
        if not isinstance(stored, str):  # is_ref, spelled out for the type checker
            return bytes(stored)
        if self.blobs is None:
            raise StorageError(f"{stored} names a blob, but an in-memory database has none")
        return self.blobs.read(stored)

    def open_value(self, stored: bytes | str) -> IO[bytes]:
        """Open the bytes a column's value stands for as a file: a blob's own, or in memory.

        Unpickling from it reads a large value straight into its objects, without first
        holding its pickle in memory.
        """
        if not isinstance(stored, str):
            return io.BytesIO(stored)  # shares the bytes' buffer; no copy
        if self.blobs is None:
            raise StorageError(f"{stored} names a blob, but an in-memory database has none")
        return self.blobs.open(stored)

    def blob_ref(self, digest: str, size: int) -> str:
        """Return the reference of a stored blob; StorageError if no such blob is stored."""
        if self.blobs is None or not self.blobs.has(digest, size):
            raise StorageError(f"no blob {digest} of {size} bytes is stored; upload it first")
        return make_ref(digest, size)

    def task_args(self, request_id: int, job_index: int) -> bytes | str:
        """Return task ``job_index``'s stored argument: inline bytes or a blob reference."""
        with self._lock:
            row = self.conn.execute(
                "SELECT args FROM tasks WHERE request_id = ? AND idx = ?", (request_id, job_index)
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)
        stored: bytes | str = row[0]
        return stored

    def _check_task(self, request_id: int, job_index: int) -> None:
        (n_tasks,) = self._request_row(request_id, "n_tasks")
        raise UnknownTaskError(request_id, job_index, int(n_tasks))

    def store_result(self, request_id: int, job_index: int, result: bytes) -> bool:
        """Store a pickled result unless the task is already finished; True if stored."""
        stored = self.store_value(result)  # a blob is durable before the row names it
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET state = 'done', result = ?, finished = ?, lease = NULL,"
                " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                " AND state IN ('pending', 'leased')",
                (stored, time.time(), request_id, job_index),
            )
        if cursor.rowcount == 0:
            self._raise_if_missing(request_id, job_index)
        return cursor.rowcount == 1

    def store_error(self, request_id: int, job_index: int, error: object) -> bool:
        """Store an error (a dict, or text) unless the task is finished; True if stored."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET state = 'error', error = ?, finished = ?, lease = NULL,"
                " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                " AND state IN ('pending', 'leased')",
                (_error_json(error), time.time(), request_id, job_index),
            )
        if cursor.rowcount == 0:
            self._raise_if_missing(request_id, job_index)
        return cursor.rowcount == 1

    def _raise_if_missing(self, request_id: int, job_index: int) -> None:
        with self._lock:
            row = self.conn.execute(
                "SELECT 1 FROM tasks WHERE request_id = ? AND idx = ?", (request_id, job_index)
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)

    def _count(self, request_id: int, states: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(states))
        with self._lock:
            (count,) = self.conn.execute(
                f"SELECT count(*) FROM tasks WHERE request_id = ? AND state IN ({marks})",
                (request_id, *states),
            ).fetchone()
        if count == 0:
            self._request_row(request_id, "id")
        return int(count)

    def count_results(self, request_id: int) -> int:
        """Return how many tasks have a result."""
        return self._count(request_id, ("done",))

    def count_errors(self, request_id: int) -> int:
        """Return how many tasks ended in an error (``lost`` and ``cancelled`` included)."""
        return self._count(request_id, ("error", "cancelled"))

    def count_results_and_errors(self, request_id: int) -> int:
        """Return how many tasks are finished, whatever the outcome."""
        return self._count(request_id, ("done", "error", "cancelled"))

    def count_tasks(self, request_id: int) -> int:
        """Return the number of tasks in the request."""
        return int(self._request_row(request_id, "n_tasks")[0])

    def task_counts(self, request_id: int) -> dict[str, int]:
        """Return the number of tasks in each state, every state present."""
        self._request_row(request_id, "id")
        counts = dict.fromkeys(("pending", "leased", "done", "error", "cancelled"), 0)
        with self._lock:
            for state, count in self.conn.execute(
                "SELECT state, count(*) FROM tasks WHERE request_id = ? GROUP BY state",
                (request_id,),
            ):
                counts[state] = int(count)
        return counts

    def get_results(self, request_id: int) -> list[tuple[bytes, bytes]]:
        """Return ``(args, result)`` for every task with a result, in index order."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT args, result FROM tasks WHERE request_id = ? AND state = 'done'"
                " ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [(self.load_value(a), self.load_value(r)) for a, r in rows]

    def get_errors(self, request_id: int) -> list[tuple[bytes, str]]:
        """Return ``(args, error text)`` for every failed or cancelled task, in index order.

        The text is the remote traceback, as Sheepdog 0.2 returned it (or
        ``"Type: message"`` for an error without one, such as a lost task).
        :meth:`get_task_errors` gives the index and every detail as a dict.
        """
        return [(args, error_text(error)) for _, args, error in self.get_task_errors(request_id)]

    def get_task_errors(self, request_id: int) -> list[tuple[int, bytes, dict[str, Any]]]:
        """Return ``(index, args, error dict)`` for every failed or cancelled task.

        The dict holds the worker's ``type``, ``message``, ``traceback``, ``host``,
        ``python`` and ``kind`` (``exception``, ``lost``, ``cancelled``...), plus the
        task's captured ``stdout`` and ``stderr``.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT idx, args, error, stdout, stderr FROM tasks WHERE request_id = ?"
                " AND state IN ('error', 'cancelled') ORDER BY idx",
                (request_id,),
            ).fetchall()
        out = []
        for idx, args, error, stdout, stderr in rows:
            data = _load_error(error)
            data.setdefault("kind", "exception")
            data.setdefault("stdout", stdout or "")
            data.setdefault("stderr", stderr or "")
            out.append((int(idx), self.load_value(args), data))
        return out

    def get_tasks_with_results(self, request_id: int) -> list[tuple[bytes, bytes | None]]:
        """Return ``(args, result or None)`` for every task, in index order."""
        return [
            (self.load_value(a), None if r is None else self.load_value(r))
            for a, r in self.get_tasks_with_stored_results(request_id)
        ]

    def get_tasks_with_stored_results(
        self, request_id: int
    ) -> list[tuple[bytes | str, bytes | str | None]]:
        """As :meth:`get_tasks_with_results`, with large values as blob references.

        Read each with :meth:`open_value`, so that only one is in memory at a time.
        """
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT args, CASE WHEN state = 'done' THEN result END FROM tasks"
                " WHERE request_id = ? ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [(a, r) for a, r in rows]

    def finished_since(
        self, request_id: int, after: int = 0
    ) -> tuple[int, list[tuple[int, str, bytes | None, dict[str, Any] | None]]]:
        """Return the tasks that finished after mark ``after``, and the mark to pass next.

        Each task comes as ``(index, state, result or None, error dict or None)``,
        in the order they finished, read once: a caller polling with the mark it
        got back reads every finished task's result once over a request (a task
        rerun and finished again comes again). Start with ``after=0``.
        """
        self._request_row(request_id, "id")
        with self._lock:
            marks = self.conn.execute(
                "SELECT seq, idx FROM finished_log WHERE request_id = ? AND seq > ?"
                " ORDER BY seq",
                (request_id, after),
            ).fetchall()
            if not marks:
                return after, []
            rows = []
            for _, idx in marks:
                rows.append(self.conn.execute(
                    "SELECT idx, state, CASE WHEN state = 'done' THEN result END, error,"
                    " stdout, stderr FROM tasks WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                ).fetchone())
        out: list[tuple[int, str, bytes | None, dict[str, Any] | None]] = []
        for idx, state, result, error, stdout, stderr in rows:
            if state in OPEN_STATES:  # rerun since it finished: it will come again
                continue
            data = None
            if state != "done":
                data = _load_error(error)
                data.setdefault("kind", "exception")
                data.setdefault("stdout", stdout or "")
                data.setdefault("stderr", stderr or "")
            value = None if result is None else self.load_value(result)
            out.append((int(idx), str(state), value, data))
        return int(marks[-1][0]), out

    def task_states(self, request_id: int) -> list[str]:
        """Return every task's state (``pending``, ``leased``, ``done``...), in index order."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT state FROM tasks WHERE request_id = ? ORDER BY idx", (request_id,)
            ).fetchall()
        return [str(state) for (state,) in rows]

    def get_task(self, request_id: int, idx: int) -> dict[str, Any]:
        """Return every column of one task as a dict (``error`` decoded)."""
        with self._lock:
            cursor = self.conn.execute(
                "SELECT * FROM tasks WHERE request_id = ? AND idx = ?", (request_id, idx)
            )
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        if row is None:
            self._check_task(request_id, idx)
        task = dict(zip(names, row))
        task["error"] = _load_error(task["error"]) if task["error"] is not None else None
        return task

    def open_task_indices(self, request_id: int) -> list[int]:
        """Return the indices of tasks still pending or leased."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT idx FROM tasks WHERE request_id = ? AND state IN ('pending', 'leased')"
                " ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [int(r[0]) for r in rows]

    # -- the queue -----------------------------------------------------------------

    def _info(self, conn: sqlite3.Connection, request_id: int) -> tuple[str, int, int]:
        """Return the request's ``(state, n_tasks, max_attempts)`` inside a transaction."""
        row = conn.execute(
            "SELECT state, n_tasks, settings FROM requests WHERE id = ?", (request_id,)
        ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        settings = json.loads(row[2])
        max_attempts = int(settings.get("max_attempts", DEFAULT_SETTINGS["max_attempts"]))
        return str(row[0]), int(row[1]), max_attempts

    def _expire(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        now: float,
        max_attempts: int,
        *,
        every_lease: bool = False,
    ) -> int:
        # ``now`` is also the finish time of a task given up as lost, so it stays the real
        # time; ``every_lease`` expires the leases that have not run out yet as well.
        overdue = conn.execute(
            "SELECT idx, attempts, host, lease_expires FROM tasks WHERE request_id = ?"
            " AND state = 'leased' AND lease_expires < ?",
            (request_id, float("inf") if every_lease else now),
        ).fetchall()
        for idx, attempts, host, expires in overdue:
            expired = min(expires, now)
            if attempts + 1 >= max_attempts:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expired))
                error = {
                    "type": "LostTask",
                    "message": (
                        f"task {idx} was lost {attempts + 1} times; last leased to "
                        f"{host or 'an unknown host'}, lease expired at {when}"
                    ),
                    "traceback": "",
                    "host": host,
                    "kind": "lost",
                    "time": expired,
                }
                conn.execute(
                    "UPDATE tasks SET state = 'error', attempts = attempts + 1, error = ?,"
                    " lease = NULL, lease_expires = NULL, finished = ?"
                    " WHERE request_id = ? AND idx = ?",
                    (json.dumps(error), now, request_id, idx),
                )
                logger.warning("request %d task %d lost on %s", request_id, idx, host)
            else:
                conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = attempts + 1, lease = NULL,"
                    " lease_expires = NULL WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
        return len(overdue)

    def expire_leases(
        self, request_id: int, *, now: float | None = None, every_lease: bool = False
    ) -> int:
        """Return overdue leased tasks to pending (or make them lost); return how many.

        ``every_lease`` expires all leases, overdue or not: for when no worker is left
        to renew them (every job of the request has left the queue).
        """
        self._request_row(request_id, "id")
        with self._write() as conn:
            _, _, max_attempts = self._info(conn, request_id)
            return self._expire(
                conn, request_id, time.time() if now is None else now, max_attempts,
                every_lease=every_lease,
            )

    def lease(
        self,
        request_id: int,
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
    ) -> list[Lease]:
        """Lease up to ``max_tasks`` pending tasks to ``worker`` for ``lease_s`` seconds.

        Overdue leases are expired first. A cancelled request leases nothing. With
        ``reclaim`` (the worker is retrying a call whose answer it never got), tasks still
        leased to this worker on this host come first.
        """
        with self._write() as conn:
            return self.lease_in(
                conn, request_id, worker=worker, host=host, max_tasks=max_tasks, lease_s=lease_s,
                now=now, reclaim=reclaim,
            )

    def lease_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
        info: tuple[str, int, int] | None = None,
    ) -> list[Lease]:
        """``lease`` inside the caller's write transaction (see ``answer_once``).

        ``info`` is the request's ``(state, n_tasks, max_attempts)`` when the caller
        has read it already (``CallAuth.info``); else it is read here.
        """
        now = time.time() if now is None else now
        info = self._info(conn, request_id) if info is None else info
        return self._lease(conn, request_id, info, worker, host, max_tasks, lease_s, now, reclaim)

    def _lease(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        info: tuple[str, int, int],
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float,
        reclaim: bool = False,
    ) -> list[Lease]:
        state, _, max_attempts = info
        self._expire(conn, request_id, now, max_attempts)
        if state != "open" or max_tasks <= 0:
            return []
        rows = []
        if reclaim:
            # A worker asks for work only after it has reported every task it held, so on a
            # retried call a task still leased to it is one whose lease never reached it: the
            # answer was lost (the server died, or the connection dropped, after the commit).
            # Hand such tasks back first; otherwise they sit orphaned until their lease
            # expires, and if every worker has exited by then, nobody runs them.
            rows = conn.execute(
                "SELECT idx, attempts, args FROM tasks WHERE request_id = ? AND state = 'leased'"
                " AND worker = ? AND host = ? ORDER BY idx LIMIT ?",
                (request_id, worker, host, max_tasks),
            ).fetchall()
        if len(rows) < max_tasks:
            # "lease_expires IS NULL" holds for every pending task (each way into 'pending'
            # clears it); saying so lets SQLite read tasks_by_state in idx order. Without
            # it SQLite walked the primary key from task 1, over every finished task, on
            # every lease: the cost of a lease grew with the request's progress.
            rows += conn.execute(
                "SELECT idx, attempts, args FROM tasks WHERE request_id = ? AND state = 'pending'"
                " AND lease_expires IS NULL ORDER BY idx LIMIT ?",
                (request_id, max_tasks - len(rows)),
            ).fetchall()
        expires = now + lease_s
        leases = []
        for idx, attempts, args in rows:
            token = secrets.token_hex(8)
            conn.execute(
                "UPDATE tasks SET state = 'leased', lease = ?, lease_expires = ?, worker = ?,"
                " host = ?, started = ? WHERE request_id = ? AND idx = ?",
                (token, expires, worker, host, now, request_id, idx),
            )
            stored = args if is_ref(args) else bytes(args)  # a blob is fetched by the worker
            leases.append(Lease(int(idx), int(attempts) + 1, token, stored, expires))
        return leases

    def renew(
        self,
        request_id: int,
        worker: str,
        leases: Iterable[str],
        lease_s: float,
        *,
        now: float | None = None,
    ) -> tuple[list[str], list[str]]:
        """Extend the given leases by ``lease_s``; return ``(renewed, lost)`` tokens.

        A lease is lost when its task was re-leased, finished or cancelled. A lease
        that expired but whose task nobody took yet is renewed: the work is not lost.
        """
        with self._write() as conn:
            return self.renew_in(conn, request_id, worker, leases, lease_s, now=now)

    def renew_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        worker: str,
        leases: Iterable[str],
        lease_s: float,
        *,
        now: float | None = None,
    ) -> tuple[list[str], list[str]]:
        """``renew`` inside the caller's write transaction (see ``answer_once``)."""
        now = time.time() if now is None else now
        renewed: list[str] = []
        lost: list[str] = []
        found = conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
        if found is None:
            raise UnknownRequestError(request_id, self.dbfile)
        for token in leases:
            cursor = conn.execute(RENEW_SQL, (now + lease_s, worker, request_id, token))
            (renewed if cursor.rowcount else lost).append(token)
        return renewed, lost

    def complete(
        self, request_id: int, results: Iterable[dict[str, Any]]
    ) -> tuple[list[int], list[int]]:
        """Store results as the protocol's results endpoint gives them (values as bytes).

        Each dict has ``index`` and ``ok``, then ``value`` (bytes) or ``error`` (dict),
        and optionally ``stdout``, ``stderr``, ``duration_s``, ``worker``, ``host``.
        The first result per task wins; returns ``(accepted, duplicates)`` indices.
        A result for an index outside the request raises StorageError and stores nothing.
        """
        with self._write() as conn:
            _, n_tasks, _ = self._info(conn, request_id)
            return self._complete(conn, request_id, n_tasks, results)

    def complete_and_lease(
        self,
        request_id: int,
        results: Iterable[dict[str, Any]],
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
    ) -> tuple[list[int], list[int], list[Lease]]:
        """Do ``complete`` then ``lease`` in one transaction (one disk sync per round trip)."""
        with self._write() as conn:
            return self.complete_and_lease_in(
                conn, request_id, results, worker=worker, host=host, max_tasks=max_tasks,
                lease_s=lease_s, now=now, reclaim=reclaim,
            )

    def complete_and_lease_in(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        results: Iterable[dict[str, Any]],
        *,
        worker: str,
        host: str,
        max_tasks: int,
        lease_s: float,
        now: float | None = None,
        reclaim: bool = False,
        info: tuple[str, int, int] | None = None,
    ) -> tuple[list[int], list[int], list[Lease]]:
        """``complete_and_lease`` inside the caller's write transaction (see ``answer_once``).

        ``info`` as for ``lease_in``.
        """
        now = time.time() if now is None else now
        info = self._info(conn, request_id) if info is None else info
        accepted, duplicates = self._complete(conn, request_id, info[1], results)
        leases = self._lease(conn, request_id, info, worker, host, max_tasks, lease_s, now,
                             reclaim)
        return accepted, duplicates, leases

    # -- nonces ----------------------------------------------------------------------

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

    def _complete(
        self,
        conn: sqlite3.Connection,
        request_id: int,
        n_tasks: int,
        results: Iterable[dict[str, Any]],
    ) -> tuple[list[int], list[int]]:
        accepted: list[int] = []
        duplicates: list[int] = []
        now = time.time()
        for r in results:
            index = int(r["index"])
            if not 1 <= index <= n_tasks:
                raise UnknownTaskError(request_id, index, n_tasks)
            if r["ok"]:
                # The server names an uploaded blob by its reference; other callers give bytes.
                value = r["value"] if is_ref(r["value"]) else self.store_value(r["value"])
                state, error = "done", None
            else:
                state, value = "error", None
                error = json.dumps({"kind": "exception", **r["error"]})
            cursor = conn.execute(
                "UPDATE tasks SET state = ?, result = ?, error = ?, stdout = ?, stderr = ?,"
                " duration_s = ?, finished = ?, worker = coalesce(?, worker),"
                " host = coalesce(?, host), lease = NULL, lease_expires = NULL"
                " WHERE request_id = ? AND idx = ? AND state IN ('pending', 'leased')",
                (
                    state,
                    value,
                    error,
                    r.get("stdout"),
                    r.get("stderr"),
                    r.get("duration_s"),
                    now,
                    r.get("worker"),
                    r.get("host"),
                    request_id,
                    index,
                ),
            )
            (accepted if cursor.rowcount else duplicates).append(index)
        return accepted, duplicates

    def cancel(self, request_id: int, reason: str = "cancelled by the user") -> int:
        """Cancel the request: no more leases, open tasks become cancelled; return how many."""
        error = json.dumps(
            {"type": "Cancelled", "message": reason, "traceback": "", "kind": "cancelled"}
        )
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE requests SET state = 'cancelled' WHERE id = ?", (request_id,)
            )
            if cursor.rowcount == 0:
                raise UnknownRequestError(request_id, self.dbfile)
            cursor = conn.execute(
                "UPDATE tasks SET state = 'cancelled', error = ?, finished = ?, lease = NULL,"
                " lease_expires = NULL WHERE request_id = ? AND state IN ('pending', 'leased')",
                (error, time.time(), request_id),
            )
        return cursor.rowcount

    def fail_tasks(
        self,
        request_id: int,
        indices: Iterable[int],
        kind: str,
        message: str,
        *,
        type_name: str = "TaskFailed",
        host: str | None = None,
        traceback: str = "",
        extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """Turn the given open tasks into errors of ``kind``; return the indices changed."""
        error = json.dumps(
            {
                "type": type_name,
                "message": message,
                "traceback": traceback,
                "host": host,
                "kind": kind,
                **(extra or {}),
            }
        )
        changed = []
        now = time.time()
        self._request_row(request_id, "id")
        with self._write() as conn:
            for idx in indices:
                cursor = conn.execute(
                    "UPDATE tasks SET state = 'error', error = ?, finished = ?, lease = NULL,"
                    " lease_expires = NULL WHERE request_id = ? AND idx = ?"
                    " AND state IN ('pending', 'leased')",
                    (error, now, request_id, idx),
                )
                if cursor.rowcount:
                    changed.append(int(idx))
        return changed

    def reset_tasks(self, request_id: int, indices: Iterable[int]) -> list[int]:
        """Make unfinished-or-failed tasks pending again, attempts from 0, for resubmission.

        Tasks with a result are left alone; so is a cancelled request's work
        unless the request is reopened. Returns the indices changed.
        """
        changed = []
        self._request_row(request_id, "id")
        with self._write() as conn:
            for idx in indices:
                cursor = conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = 0, lease = NULL,"
                    " lease_expires = NULL, error = NULL, finished = NULL"
                    " WHERE request_id = ? AND idx = ? AND state IN ('pending', 'leased', 'error')",
                    (request_id, idx),
                )
                if cursor.rowcount:
                    changed.append(int(idx))
        return changed

    def rerun_tasks(self, request_id: int, which: Iterable[str]) -> list[int]:
        """Make the request's tasks in the chosen end states pending again; return their indices.

        ``which`` holds names from :data:`RERUN_CHOICES`. What each task ended
        with is kept in its history (:meth:`get_task_history`); a task with a
        result is never chosen. The request is reopened (a cancelled request
        takes leases again).
        """
        chosen = list(dict.fromkeys(which))
        unknown = [w for w in chosen if w not in RERUN_CHOICES]
        if unknown or not chosen:
            raise ValueError(
                f"cannot rerun {unknown or chosen!r}: choose one or more of "
                f"{', '.join(RERUN_CHOICES)}"
            )
        where = " OR ".join(RERUN_CHOICES[w] for w in chosen)
        with self._write() as conn:
            found = conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
            if found is None:
                raise UnknownRequestError(request_id, self.dbfile)
            rows = conn.execute(
                f"SELECT idx FROM tasks WHERE request_id = ? AND ({where}) ORDER BY idx",  # noqa: S608 - fixed conditions
                (request_id,),
            ).fetchall()
            indices = [int(r[0]) for r in rows]
            for idx in indices:
                conn.execute(
                    "INSERT INTO task_history (request_id, idx, run, state, error, host, stdout,"
                    " stderr, attempts, finished) SELECT request_id, idx, 1 + (SELECT count(*)"
                    " FROM task_history h WHERE h.request_id = t.request_id AND h.idx = t.idx),"
                    " state, error, host, stdout, stderr, attempts, finished FROM tasks t"
                    " WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
                conn.execute(
                    "UPDATE tasks SET state = 'pending', attempts = 0, lease = NULL,"
                    " lease_expires = NULL, error = NULL, result = NULL, finished = NULL,"
                    " started = NULL, stdout = NULL, stderr = NULL, duration_s = NULL"
                    " WHERE request_id = ? AND idx = ?",
                    (request_id, idx),
                )
            if indices:
                conn.execute("UPDATE requests SET state = 'open' WHERE id = ?", (request_id,))
                # The watcher counts resubmissions from the rerun's job on.
                conn.execute(
                    "UPDATE jobs SET info = json_set(info, '$.before_rerun', json('true'))"
                    " WHERE request_id = ?",
                    (request_id,),
                )
        return indices

    def get_task_history(self, request_id: int, idx: int) -> list[dict[str, Any]]:
        """Return how the task's earlier runs ended, oldest first (``error`` decoded)."""
        (n_tasks,) = self._request_row(request_id, "n_tasks")
        if not 1 <= idx <= int(n_tasks):
            raise UnknownTaskError(request_id, idx, int(n_tasks))
        with self._lock:
            cursor = self.conn.execute(
                "SELECT * FROM task_history WHERE request_id = ? AND idx = ? ORDER BY run",
                (request_id, idx),
            )
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        out = []
        for row in rows:
            entry = dict(zip(names, row))
            entry["error"] = _load_error(entry["error"]) if entry["error"] is not None else None
            out.append(entry)
        return out

    # -- Grid Engine jobs ----------------------------------------------------------

    def add_job(
        self,
        request_id: int,
        job_id: str,
        array_size: int,
        *,
        submitted: float | None = None,
        state: str = "submitted",
        info: dict[str, Any] | None = None,
    ) -> None:
        """Record a Grid Engine job submitted for the request."""
        self._request_row(request_id, "id")
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO jobs (request_id, job_id, array_size, submitted, state,"
                " info) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    job_id,
                    array_size,
                    time.time() if submitted is None else submitted,
                    state,
                    json.dumps(info or {}),
                ),
            )

    def set_job_state(
        self, request_id: int, job_id: str, state: str, info: dict[str, Any] | None = None
    ) -> None:
        """Update a recorded job's state (and replace its info when given)."""
        with self._write() as conn:
            if info is None:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ? WHERE request_id = ? AND job_id = ?",
                    (state, request_id, job_id),
                )
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET state = ?, info = ? WHERE request_id = ? AND job_id = ?",
                    (state, json.dumps(info), request_id, job_id),
                )
        if cursor.rowcount == 0:
            raise StorageError(f"request {request_id} has no job {job_id!r}")

    def listen_address_for_port(self, port: int) -> str | None:
        """Return where the last server on ``port`` listened for submitted jobs, if recorded."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT info FROM jobs ORDER BY submitted DESC, rowid DESC"
            ).fetchall()
        for (text,) in rows:
            info = json.loads(text)
            if info.get("port") == port and isinstance(info.get("listen_address"), str):
                return str(info["listen_address"])
        return None

    def get_jobs(self, request_id: int) -> list[dict[str, Any]]:
        """Return the request's recorded jobs, oldest first."""
        self._request_row(request_id, "id")
        with self._lock:
            rows = self.conn.execute(
                "SELECT job_id, array_size, submitted, state, info FROM jobs"
                " WHERE request_id = ? ORDER BY submitted, job_id",
                (request_id,),
            ).fetchall()
        return [
            {"job_id": j, "array_size": a, "submitted": s, "state": st, "info": json.loads(i)}
            for j, a, s, st, i in rows
        ]
