"""Large values as files beside the database, named by their SHA-256.

A pickled argument or result longer than ``INLINE_MAX_BYTES`` is not kept in
SQLite: it is a file ``<db>.blobs/<sha256>`` (directory 0700, files 0600, as
the database, since they hold the user's data), and the database keeps a
reference to it, the text ``sha256:<hex>:<size>``. SQLite gives a column's text
as ``str`` and its blobs as ``bytes``, so a reference can never be mistaken for
an inline value. Content addressing makes every write idempotent: the same
bytes uploaded twice, by a retry or by two workers, are the same file.

A blob is durable before anyone is told it is stored: it is written to a
temporary file in the same directory, fsynced, renamed to its name, and the
directory is fsynced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sheepdog.errors import StorageError

__all__ = [
    "BLOB_DIR_MODE",
    "INLINE_MAX_BYTES",
    "STALE_UPLOAD_S",
    "BlobStore",
    "is_ref",
    "make_ref",
    "parse_ref",
]

logger = logging.getLogger(__name__)

#: Values up to this many bytes stay in SQLite; longer ones are files in the blob store.
INLINE_MAX_BYTES = 64 * 1024
#: The blob directory: its files hold users' arguments and results, like the database.
BLOB_DIR_MODE = 0o700
_CHUNK_BYTES = 1024 * 1024
#: The temporary files of uploads being written.
_INCOMING_PREFIX = ".incoming-"
#: An upload's temporary file untouched for this long belongs to a server that died.
STALE_UPLOAD_S = 3600.0
_REF_RE = re.compile(r"sha256:([0-9a-f]{64}):([0-9]{1,19})")


def make_ref(digest: str, size: int) -> str:
    """The text the database keeps for a blob: ``sha256:<hex>:<size>``."""
    return f"sha256:{digest}:{size}"


def is_ref(value: object) -> bool:
    """Whether a column's value is a blob reference (text) rather than inline bytes."""
    return isinstance(value, str)


def parse_ref(ref: str) -> tuple[str, int]:
    """Return ``(sha256 hex, size)`` of a blob reference; StorageError if it is not one."""
    match = _REF_RE.fullmatch(ref)
    if match is None:
        raise StorageError(f"{ref[:100]!r} in the database is not a blob reference")
    return match.group(1), int(match.group(2))


class BlobStore:
    """The content-addressed files of one database, in ``directory`` (created on first write)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"<BlobStore {str(self.directory)!r}>"

    def path(self, digest: str) -> Path:
        """The file of the blob with this SHA-256 (hex)."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{digest[:80]!r} is not a SHA-256 in lowercase hex")
        return self.directory / digest

    def has(self, digest: str, size: int) -> bool:
        """Whether the blob is stored, with that size."""
        try:
            return self.path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(mode=BLOB_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the blob directory {self.directory}: {exc}") from exc
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(self.directory, BLOB_DIR_MODE)

    @contextmanager
    def writer(self) -> Iterator[IO[bytes]]:
        """Yield a 0600 temporary file in the store; the caller then calls ``commit``.

        On an exception, or without a commit, the temporary file is removed: a
        refused upload leaves nothing behind.
        """
        self._ensure_dir()
        fd, name = tempfile.mkstemp(prefix=_INCOMING_PREFIX, dir=self.directory)  # mode 0600
        os.close(fd)  # reopened by name, so that commit() knows what to rename
        try:
            with open(name, "wb") as f:
                yield f
        finally:
            try:
                os.unlink(name)  # gone already when committed (renamed)
            except FileNotFoundError:
                pass

    def remove_stale_uploads(self, older_than_s: float = STALE_UPLOAD_S) -> list[str]:
        """Delete the temporary files of uploads that stopped ``older_than_s`` ago; return them.

        A server killed mid-upload leaves its ``.incoming-*`` file behind; one still
        being written (by another server on this database) is newer.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if not entry.name.startswith(_INCOMING_PREFIX):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %d unfinished uploads from %s", len(removed), self.directory)
        return removed

    def commit(self, f: IO[bytes], digest: str) -> Path:
        """Make the writer's file durable under its SHA-256 name; return its path."""
        f.flush()
        os.fsync(f.fileno())
        target = self.path(digest)
        os.rename(f.name, target)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)
        return target

    def put(self, data: bytes | bytearray | memoryview, digest: str | None = None) -> str:
        """Store ``data`` durably; return its reference (``sha256:<hex>:<size>``).

        ``digest``, the data's SHA-256 when the caller has it already, saves hashing it again.
        """
        digest = digest or hashlib.sha256(data).hexdigest()
        if not self.has(digest, len(data)):
            with self.writer() as f:
                f.write(data)
                self.commit(f, digest)
        return make_ref(digest, len(data))

    def open(self, ref: str) -> IO[bytes]:
        """Open a referenced blob's file for reading (StorageError if it cannot be)."""
        path = self.path(parse_ref(ref)[0])
        try:
            return open(path, "rb")
        except OSError as exc:
            raise StorageError(
                f"the value {ref} is stored in {path}, which cannot be read ({exc}); the blob "
                "directory must stay beside its database"
            ) from exc

    def read(self, ref: str) -> bytes:
        """Return the bytes of a referenced blob, read in one piece (StorageError if missing)."""
        digest, size = parse_ref(ref)
        path = self.path(digest)
        with self.open(ref) as f:
            data = f.read()
        if len(data) != size:
            raise StorageError(f"{path} holds {len(data)} bytes, not the {size} recorded")
        return data
