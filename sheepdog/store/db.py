"""The SQLite database under the store: connection, WAL, migrations, the write queue, blobs.

The database is the queue between the library and the workers. Every write
that decides who owns a task runs inside ``BEGIN IMMEDIATE`` (:meth:`Database._write`)
so that many server processes can share one file: a task is never leased to two
workers, and the first result for a task wins.

Durability: the connection uses WAL with ``synchronous=FULL`` by default, and
every write commits before the method returns, so a result that the server has
acknowledged survives the server being killed (and, with ``FULL``, a power cut).
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, TypeVar

from ..blobs import INLINE_MAX_BYTES, BlobStore, make_ref
from ..errors import StorageError, UnknownRequestError, UnknownTaskError
from ..poll import poll_until
from . import upgrade02
from .states import OPEN_STATES

try:
    import fcntl
except ImportError:  # Windows: no write queue, SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DB_FILE_MODE",
    "DEFAULT_DBFILE",
    "DEFAULT_SETTINGS",
    "MIGRATIONS",
    "OPEN_STATES",
    "OPEN_STATES_SQL",
    "SCHEMA_VERSION",
    "Database",
    "WouldWait",
    "require_database",
    "without_waiting",
]

logger = logging.getLogger(__name__)

#: The database every entry point opens unless told otherwise, as Sheepdog 0.2 did.
DEFAULT_DBFILE = "./sheepdog.sqlite"

#: Settings a request gets unless ``new_request(settings=...)`` says otherwise.
DEFAULT_SETTINGS: dict[str, Any] = {
    "lease_s": 120.0,
    "heartbeat_s": 30.0,
    "task_timeout_s": None,
    "batch": 1,
    "capture_bytes": 65536,
    "max_attempts": 3,
}

#: :data:`~.states.OPEN_STATES` as an SQL list: ``state IN {OPEN_STATES_SQL}``.
OPEN_STATES_SQL = "(" + ", ".join(f"'{state.value}'" for state in OPEN_STATES) + ")"

#: The database and its sibling files hold every request's secret, payload and result.
DB_FILE_MODE = 0o600
#: Files SQLite (and our write queue) keep beside the database, named by these suffixes.
SIBLING_SUFFIXES = ("-wal", "-shm", "-journal", "-writers")

#: Threads that write a new request's large arguments to the blob store.
BLOB_WRITERS = 4
BUSY_TIMEOUT_MS = 30_000  # as the original's 0.2.3: many writers wait rather than fail

#: One lock per database and process, taken before the write queue's flock: threads of
#: one process (a gunicorn worker's) wait on it without polling, so at most one of them
#: polls the flock. Keyed by the write queue's path; rebuilt in a forked child, where a
#: lock held by another thread at the fork would never be released.
_writer_locks: dict[str, threading.RLock] = {}
_writer_locks_guard = threading.Lock()


#: Set by :func:`without_waiting`: this context's database calls must not wait for a lock.
_NO_WAIT: ContextVar[bool] = ContextVar("sheepdog_store_no_wait", default=False)


class WouldWait(Exception):  # noqa: N818 - it says what happened, as StopIteration does
    """A call made :func:`without_waiting` found a lock held, and changed nothing."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock held elsewhere (SQLITE_BUSY or SQLITE_LOCKED)."""
    return "locked" in str(exc) or "busy" in str(exc)


class _WithoutWaiting:
    """What :func:`without_waiting` returns: a class, as it is entered for every server call."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _NO_WAIT.set(True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _NO_WAIT.reset(self._token)
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            raise WouldWait(str(exc)) from exc


def without_waiting() -> AbstractContextManager[None]:
    """Make this context's database calls raise :class:`WouldWait` rather than wait for a lock.

    For a caller that must not block, the server's event loop: it runs a call
    here, where most calls find no lock held and cost no hand-over to a thread,
    and runs it again in a thread if it raises WouldWait. A write raises before
    its transaction begins, a read when SQLite answers "busy"; either way,
    nothing was changed.
    """
    return _WithoutWaiting()


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
    original = upgrade02.is_original(conn)
    if original:
        upgrade02.set_aside(conn)
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
        upgrade02.copy_into_schema(conn, DEFAULT_SETTINGS)


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
    "INSERT INTO finished_log (request_id, idx) SELECT request_id, idx FROM tasks"  # noqa: S608 - fixed SQL, bound values
    f" WHERE state NOT IN {OPEN_STATES_SQL} ORDER BY finished, request_id, idx",
    f"""CREATE TRIGGER IF NOT EXISTS tasks_finished AFTER UPDATE OF state ON tasks
    WHEN OLD.state IN {OPEN_STATES_SQL} AND NEW.state NOT IN {OPEN_STATES_SQL}
    BEGIN
        INSERT INTO finished_log (request_id, idx) VALUES (NEW.request_id, NEW.idx);
    END""",  # noqa: S608 - fixed SQL
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


_V4_STATEMENTS = (
    # What each worker reported of its Python and of the modules the function names, once
    # (docs/protocol.rst, "lease"), so that a map can warn of versions unlike this machine's.
    """CREATE TABLE IF NOT EXISTS worker_envs (
        request_id  INTEGER NOT NULL REFERENCES requests (id),
        worker      TEXT    NOT NULL,
        host        TEXT    NOT NULL,
        python      TEXT    NOT NULL,
        modules     TEXT    NOT NULL,
        reported    REAL    NOT NULL,
        PRIMARY KEY (request_id, worker)
    )""",
)


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    for statement in _V4_STATEMENTS:
        conn.execute(statement)


#: Migration steps: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migrate_to_1, _migrate_to_2, _migrate_to_3, _migrate_to_4,
]

SCHEMA_VERSION = len(MIGRATIONS)


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

_D = TypeVar("_D", bound="Database")


def require_database(
    dbfile: str, hint: str = "pass the dbfile the request was made with"
) -> None:
    """Raise StorageError, ending with ``hint``, unless a database file exists at ``dbfile``.

    For a reader, which must never create a database: opening a mistyped path
    would make an empty one, and then say only that the request is unknown.
    ``Database(create=False)`` checks this first; call it to check earlier.
    """
    if not Path(dbfile).is_file():
        raise StorageError(f"no sheepdog database at {dbfile}: the file does not exist; {hint}")


class Database:
    """One connection to a sheepdog SQLite database; usable as a context manager.

    Opening creates and migrates the schema unless ``init=False`` (for callers,
    the server, that know it is current). ``create=False`` is for readers: a
    file that does not exist is a :class:`StorageError` saying so, and nothing
    is created. The object may be shared between threads: calls are serialised
    on one lock.
    """

    def __init__(
        self,
        dbfile: str | Path = DEFAULT_DBFILE,
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
        #: The connection's busy timeout now: BUSY_TIMEOUT_MS, or 0 without_waiting().
        self._busy_ms = BUSY_TIMEOUT_MS
        self._queue: IO[bytes] | None = None
        self._queue_path = ""
        self._nonces_pruned_at = 0.0
        in_memory = self.dbfile in ("", ":memory:")
        #: Values longer than INLINE_MAX_BYTES live here; an in-memory database keeps all inline.
        self.blobs: BlobStore | None = None if in_memory else BlobStore(self.dbfile + ".blobs")
        if not create and not in_memory:
            require_database(self.dbfile)
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
        except Exception:  # noqa: BLE001, S110 - nothing useful to do in a finaliser
            pass

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dbfile!r})"

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection; raises StorageError once closed.

        Its busy timeout follows the caller: none :func:`without_waiting`, else
        BUSY_TIMEOUT_MS. It is set only when that changes, so a caller that stays
        in one mode pays nothing for it.
        """
        if self._conn is None:
            raise StorageError(f"this Storage for {self.dbfile} is closed; open a new one")
        busy_ms = 0 if _NO_WAIT.get() else BUSY_TIMEOUT_MS
        if busy_ms != self._busy_ms:
            self._conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        return self._conn

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """Run a block in one ``BEGIN IMMEDIATE`` transaction, committed on success.

        :func:`without_waiting`, each lock is tried once, and WouldWait is raised
        before the transaction begins if one is held.
        """
        # Chosen here rather than inside one generator: each layer of generator-based
        # context manager costs a few µs, on every server call.
        if _NO_WAIT.get():
            return self._write_without_waiting()
        return self._write_waiting()

    @contextmanager
    def _write_waiting(self) -> Iterator[sqlite3.Connection]:
        """``_write`` for a caller that may wait for the locks (up to the busy timeout)."""
        with self._lock:
            conn = self.conn
            local = None if self._queue is None else _writer_lock(self._queue_path)
            # Past the busy timeout, go on: SQLite's own locking still keeps us safe.
            ours = local is not None and local.acquire(timeout=BUSY_TIMEOUT_MS / 1000)
            queued = False
            try:
                queued = self._queue_for_writing()
                conn.execute("BEGIN IMMEDIATE")
                with self._transaction(conn):
                    yield conn
            finally:
                self._end_write(queued, local if ours else None)

    @contextmanager
    def _write_without_waiting(self) -> Iterator[sqlite3.Connection]:
        """``_write`` for a caller that must not wait: WouldWait if any lock is held."""
        if not self._lock.acquire(blocking=False):
            raise WouldWait("this connection is in use")
        local = None if self._queue is None else _writer_lock(self._queue_path)
        ours = queued = False
        try:
            conn = self.conn
            if local is not None:
                ours = local.acquire(blocking=False)
                if not ours:
                    raise WouldWait("another thread of this process is writing")
            if self._queue is not None:
                try:
                    fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    queued = True
                except BlockingIOError:
                    raise WouldWait("another process is writing") from None
                except OSError:
                    pass  # a file system without flock: SQLite's locking alone, as _write
            conn.execute("BEGIN IMMEDIATE")  # "busy" becomes WouldWait in without_waiting()
            # self._transaction(conn) written out: one generator fewer per server call.
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self._end_write(queued, local if ours else None)
            self._lock.release()

    def _end_write(self, queued: bool, held: threading.RLock | None) -> None:
        """Give up the write queue's flock (if ``queued``) and this process's writer lock."""
        if queued and self._queue is not None:
            fcntl.flock(self._queue, fcntl.LOCK_UN)
        if held is not None:
            held.release()

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        """Commit the transaction begun on ``conn`` if the block succeeds, else roll it back."""
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        if not upgrade02.is_original(conn):
            return None
        # Before WAL mode is set, so that the copy is the file 0.2.3 wrote.
        return upgrade02.backup(conn, self.dbfile)

    def _request_row(self, request_id: int, columns: str) -> tuple[Any, ...]:
        with self._lock:
            row = self.conn.execute(
                f"SELECT {columns} FROM requests WHERE id = ?", (request_id,)  # noqa: S608 - the callers pass fixed column names
            ).fetchone()
        if row is None:
            raise UnknownRequestError(request_id, self.dbfile)
        return tuple(row)

    def _check_task(self, request_id: int, job_index: int) -> None:
        (n_tasks,) = self._request_row(request_id, "n_tasks")
        raise UnknownTaskError(request_id, job_index, int(n_tasks))

    def _raise_if_missing(self, request_id: int, job_index: int) -> None:
        with self._lock:
            row = self.conn.execute(
                "SELECT 1 FROM tasks WHERE request_id = ? AND idx = ?", (request_id, job_index)
            ).fetchone()
        if row is None:
            self._check_task(request_id, job_index)

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
