"""Collect the results that workers spooled when they could not reach the server.

A worker that cannot reach the server for ``worker_retry_s`` (the laptop slept,
the network dropped) writes each result it finished and the server never
acknowledged to the request's spool directory, beside the job file on the
cluster, and exits with ``EXIT_SPOOLED``. Each result is one file,
``<index>-<random>.json``, mode 0600, written whole (a temporary file, then a
rename): a header line ``{"format", "request_id", "index", "blob", "signature"}``
and a line holding the result as the worker would have posted it to
``/results``. The signature is an HMAC with the request's secret over the
request id, the task index and that result line (:func:`spool_signature`; the
stub has the same function). A large value is a ``<index>-<random>.blob`` file
beside it, named by its SHA-256 and size in the signed result line.

:func:`collect_spool` reads the files over the scheduler's host (SFTP to the
head node, or this machine), checks each one, stores its result (the first
result per task wins, so a result the server did get is not stored twice),
and deletes the files once the database has committed them. A file that fails
its check is renamed ``*.rejected`` and reported; its task stays open and is
run again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .client import stub
from .errors import SheepdogError
from .job_file import spool_dir_name
from .server.protocol import ApiError, parse_result

if TYPE_CHECKING:
    from .config import Config
    from .scheduler.base import Host
    from .storage import Storage

__all__ = [
    "MAX_SPOOL_FILE_BYTES",
    "REJECTED_SUFFIX",
    "Collection",
    "SpoolFileError",
    "collect_request_spool",
    "collect_spool",
    "read_spool_file",
    "spool_directory",
    "spool_signature",
]

logger = logging.getLogger(__name__)

#: A spool file that failed its check is renamed with this suffix and left for a person.
REJECTED_SUFFIX = ".rejected"
#: A spool file's largest size: a header and one result whose value is inline
#: (``INLINE_MAX_BYTES`` in base64) with its captured output; larger ones are set aside
#: unread. A large value is a blob file, read up to the size its signed result names.
MAX_SPOOL_FILE_BYTES = 4 * 1024 * 1024


class SpoolFileError(SheepdogError):
    """A spool file is not a result this request's workers wrote (bad signature, damaged)."""


def spool_signature(secret_hex: str, request_id: int, index: int, result_text: str) -> str:
    """The HMAC that signs a spooled result: its request, its task and its result line."""
    digest = hashlib.sha256(result_text.encode("utf-8")).hexdigest()
    message = f"spool\n{request_id}\n{index}\n{digest}".encode()
    return hmac.new(bytes.fromhex(secret_hex), message, hashlib.sha256).hexdigest()


def spool_directory(storage: Storage, config: Config, host: Host, request_id: int) -> str:
    """The absolute path, on the cluster, of the request's spool directory."""
    name = spool_dir_name(request_id, storage.get_secret(request_id))
    return f"{host.absolute(config.ssh_dir).rstrip('/')}/{name}"


def read_spool_file(
    data: bytes, secret_hex: str, request_id: int
) -> tuple[int, dict[str, Any], str | None]:
    """Check a spool file; return its task index, its result and the blob file it names.

    Raises SpoolFileError saying what is wrong: not a spool file, another request's,
    a signature that does not match the request's secret.
    """
    head_line, _, rest = data.partition(b"\n")
    result_line = rest.rstrip(b"\n")
    try:
        head = json.loads(head_line.decode("utf-8"))
        result_text = result_line.decode("utf-8")
    except (UnicodeDecodeError, ValueError) as exc:
        raise SpoolFileError(f"not a sheepdog spool file: its first line is not JSON ({exc})") \
            from None
    if not isinstance(head, dict) or head.get("format") != stub.SPOOL_MAGIC:
        raise SpoolFileError(f"not a sheepdog spool file (format {stub.SPOOL_MAGIC})")
    index, rid, signature = head.get("index"), head.get("request_id"), head.get("signature")
    if rid != request_id:
        raise SpoolFileError(f"it holds a result of request {rid!r}, not {request_id}")
    if isinstance(index, bool) or not isinstance(index, int) or not isinstance(signature, str):
        raise SpoolFileError("its header has no task index or no signature")
    expected = spool_signature(secret_hex, request_id, index, result_text)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise SpoolFileError(
            f"its signature does not match request {request_id}'s secret: it was changed "
            "after the worker wrote it, or not written by this request's worker"
        )
    try:
        result = json.loads(result_text)
    except ValueError as exc:  # signed, so a worker's bug rather than tampering
        raise SpoolFileError(f"its result line is not JSON ({exc})") from None
    if not isinstance(result, dict) or result.get("index") != index:
        raise SpoolFileError("its result does not name the task its header names")
    blob = head.get("blob")
    if blob is not None and (not isinstance(blob, str) or "/" in blob or blob.startswith(".")):
        raise SpoolFileError(f"it names a blob file {blob!r} that is not a plain file name")
    return index, result, blob


@dataclass
class Collection:
    """What collecting a request's spool did: tasks stored, already stored, files rejected."""

    request_id: int
    directory: str
    stored: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    #: (path, why) of each file that failed its check (renamed ``*.rejected``).
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        """One line for a person: how many results came from the spool, what was rejected."""
        text = (
            f"request {self.request_id}: {len(self.stored)} spooled results stored, "
            f"{len(self.duplicates)} already stored"
        )
        if self.rejected:
            text += f", {len(self.rejected)} spool files rejected (" + "; ".join(
                f"{path}: {why}" for path, why in self.rejected
            ) + ")"
        return text


def collect_spool(
    storage: Storage, host: Host, directory: str, request_id: int, *,
    max_file_bytes: int = MAX_SPOOL_FILE_BYTES,
) -> Collection:
    """Store the results spooled in ``directory``, each once; delete each file once stored.

    A file that is not a regular file, holds more than ``max_file_bytes``, or fails
    its check is renamed aside and reported; the others are still collected.

    A failed command (the head node unreachable) raises: the spool's state is
    unknown, not empty.
    """
    done = Collection(request_id, directory)
    names = host.list_dir(directory)
    if not names:
        return done
    secret = storage.get_secret(request_id)
    n_tasks = storage.count_tasks(request_id)
    for name in sorted(names):
        if name.startswith(".") or not name.endswith(".json"):
            continue  # a file being written, a blob, or one rejected before
        path = f"{directory}/{name}"
        try:
            data = host.read_bytes(path, max_bytes=max_file_bytes)
            index, result, blob = read_spool_file(data, secret, request_id)
            item = _stored_form(result, n_tasks)
            # Only a large value's blob file is read, and deleted once stored; the header's
            # blob field is not signed, so a result without one deletes nothing.
            blob_path = None
            if "blob" in item:
                blob_path = f"{directory}/{blob}" if blob else None
                if blob_path is None or blob is None:
                    raise SpoolFileError("its result has a large value but names no blob file")
                if not (blob.startswith(f"{index}-") and blob.endswith(".blob")):
                    # Its name is not signed: it may only name a blob of its own task, and it is
                    # deleted only once its bytes are the value the signed result names.
                    raise SpoolFileError(f"it names a blob file {blob!r} that is not one of "
                                         f"task {index}'s (<index>-<random>.blob)")
                item["value"] = _read_blob(host, blob_path, item.pop("blob"))
        except (SpoolFileError, OSError, RecursionError) as exc:
            # One bad file (a directory, a FIFO, a link, too large, nested too deep) is set
            # aside; the rest are collected.
            why = str(exc) if isinstance(exc, SpoolFileError) else (
                f"it cannot be read as a spool file: {type(exc).__name__}: {exc}")
            _reject(host, path, why, done)
            continue
        accepted, duplicates = storage.complete(request_id, [item])  # committed: durable
        done.stored.extend(accepted)
        done.duplicates.extend(duplicates)
        host.remove(path)
        if blob_path is not None:
            host.remove(blob_path)
        logger.debug("request %d: task %d from spool file %s (%s)", request_id, index, path,
                     "stored" if accepted else "already stored")
    if done.stored or done.duplicates or done.rejected:
        log = logger.error if done.rejected else logger.info
        log("%s", done.describe())
    return done


def collect_request_spool(
    storage: Storage, config: Config, host: Host, request_id: int
) -> Collection:
    """Collect the spool of a request in its config's ``ssh_dir`` (see :func:`collect_spool`)."""
    # Captured output is JSON in the file: at most 6 bytes per character, two streams.
    return collect_spool(
        storage, host, spool_directory(storage, config, host, request_id), request_id,
        max_file_bytes=MAX_SPOOL_FILE_BYTES + 12 * config.capture_bytes,
    )


def _stored_form(result: dict[str, Any], n_tasks: int) -> dict[str, Any]:
    """The result as Storage.complete takes it, by the server's own rules for /results.

    A large value's ``blob`` (hash, size) is left in it, for the caller to read the file.
    """
    worker = result.get("worker") if isinstance(result.get("worker"), str) else None
    host = result.get("host") if isinstance(result.get("host"), str) else None
    try:
        parsed = parse_result(result, n_tasks, worker or "spool", host or "")
    except ApiError as exc:
        raise SpoolFileError(f"its result is not one the server would take: {exc.message}") \
            from None
    parsed["worker"], parsed["host"] = worker, host
    return parsed


def _read_blob(host: Host, path: str, ref: tuple[str, int]) -> bytes:
    """The bytes of a spooled large value, checked against the signed result's hash and size."""
    digest, size = ref
    try:
        data = host.read_bytes(path, max_bytes=size)
    except FileNotFoundError:
        raise SpoolFileError(f"its blob file {path} is missing") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise SpoolFileError(f"its blob file {path} is not the value its signed result names")
    return data


def _reject(host: Host, path: str, why: str, done: Collection) -> None:
    logger.error("request %d: spool file %s rejected: %s; renamed %s%s, its task runs again",
                 done.request_id, path, why, path, REJECTED_SUFFIX)
    done.rejected.append((path, why))
    try:
        host.rename(path, path + REJECTED_SUFFIX)
    except (OSError, SheepdogError) as exc:
        logger.error("could not rename %s aside (%s); it is skipped", path, exc)
