"""HMAC signing of worker calls and server answers, as docs/protocol.rst defines it.

The key is the request's secret as raw bytes: the 64 hex characters written
into the job file are decoded with ``bytes.fromhex`` before use. The worker
stub implements the same two functions with the standard library only; the
tests cross-check both implementations.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = [
    "SIGNATURE_HEADER",
    "TIME_HEADER",
    "request_message",
    "response_message",
    "sign_request",
    "sign_response",
    "verify",
]

TIME_HEADER = "X-Sheepdog-Time"
SIGNATURE_HEADER = "X-Sheepdog-Signature"


def _key(secret_hex: str) -> bytes:
    return bytes.fromhex(secret_hex)


def request_message(method: str, path: str, time_s: int | str, body: bytes) -> bytes:
    """Return the bytes that a call's signature covers."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path}\n{time_s}\n{digest}".encode()


def response_message(request_signature: str, body: bytes) -> bytes:
    """Return the bytes that an answer's signature covers."""
    digest = hashlib.sha256(body).hexdigest()
    return f"response\n{request_signature}\n{digest}".encode()


def sign_request(secret_hex: str, method: str, path: str, time_s: int | str, body: bytes) -> str:
    """Sign a call to ``path`` made at ``time_s`` (unix seconds) with ``body``."""
    message = request_message(method, path, time_s, body)
    return hmac.new(_key(secret_hex), message, hashlib.sha256).hexdigest()


def sign_response(secret_hex: str, request_signature: str, body: bytes) -> str:
    """Sign an answer ``body`` to the call that carried ``request_signature``."""
    message = response_message(request_signature, body)
    return hmac.new(_key(secret_hex), message, hashlib.sha256).hexdigest()


def verify(expected_hex: str, given: str) -> bool:
    """Compare two signatures in constant time; any non-ASCII input simply fails."""
    # compare_digest refuses non-ASCII str, and a header may hold any latin-1 text.
    return hmac.compare_digest(expected_hex.encode("ascii"), given.encode("latin-1", "replace"))
