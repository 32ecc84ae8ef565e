"""HMAC signing of worker calls and server answers, as docs/protocol.rst defines it.

The key is the request's secret as raw bytes: the 64 hex characters of the
request's secret are decoded with ``bytes.fromhex`` before use. A call's
signature covers its method, path, time, a random nonce, and the body's length
and SHA-256, all sent in headers, so that the server can authenticate a call
before it reads a byte of its body. The worker stub implements the same
functions with the standard library only; the tests cross-check both.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

__all__ = [
    "BODY_HASH_HEADER",
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "TIME_HEADER",
    "new_nonce",
    "request_message",
    "response_message",
    "sign_request",
    "sign_response",
    "sign_response_digest",
    "signed_headers",
    "verify",
]

TIME_HEADER = "X-Sheepdog-Time"
NONCE_HEADER = "X-Sheepdog-Nonce"
BODY_HASH_HEADER = "X-Sheepdog-Body-SHA256"
SIGNATURE_HEADER = "X-Sheepdog-Signature"


def _key(secret_hex: str) -> bytes:
    return bytes.fromhex(secret_hex)


def new_nonce() -> str:
    """Return a fresh nonce: 32 random hex characters."""
    return secrets.token_hex(16)


def request_message(
    method: str, path: str, time_s: int | str, nonce: str, length: int, body_sha256: str
) -> bytes:
    """Return the bytes that a call's signature covers."""
    return f"{method.upper()}\n{path}\n{time_s}\n{nonce}\n{length}\n{body_sha256}".encode()


def response_message(request_signature: str, body: bytes) -> bytes:
    """Return the bytes that an answer's signature covers."""
    return _response_message(request_signature, hashlib.sha256(body).hexdigest())


def _response_message(request_signature: str, body_sha256: str) -> bytes:
    return f"response\n{request_signature}\n{body_sha256}".encode()


def sign_request(
    secret_hex: str,
    method: str,
    path: str,
    time_s: int | str,
    nonce: str,
    length: int,
    body_sha256: str,
) -> str:
    """Sign a call to ``path`` at ``time_s`` with ``nonce`` and a body of that length and hash."""
    message = request_message(method, path, time_s, nonce, length, body_sha256)
    return hmac.new(_key(secret_hex), message, hashlib.sha256).hexdigest()


def signed_headers(
    secret_hex: str,
    method: str,
    path: str,
    body: bytes,
    *,
    time_s: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the headers that sign a call with ``body`` (a fresh nonce and the time now)."""
    stamp = str(int(time.time()) if time_s is None else time_s)
    nonce = new_nonce() if nonce is None else nonce
    digest = hashlib.sha256(body).hexdigest()
    return {
        TIME_HEADER: stamp,
        NONCE_HEADER: nonce,
        BODY_HASH_HEADER: digest,
        SIGNATURE_HEADER: sign_request(secret_hex, method, path, stamp, nonce, len(body), digest),
    }


def sign_response(secret_hex: str, request_signature: str, body: bytes) -> str:
    """Sign an answer ``body`` to the call that carried ``request_signature``."""
    return sign_response_digest(secret_hex, request_signature, hashlib.sha256(body).hexdigest())


def sign_response_digest(secret_hex: str, request_signature: str, body_sha256: str) -> str:
    """Sign an answer whose body's SHA-256 is known (a stored blob) without reading it."""
    message = _response_message(request_signature, body_sha256)
    return hmac.new(_key(secret_hex), message, hashlib.sha256).hexdigest()


def verify(expected_hex: str, given: str) -> bool:
    """Compare two signatures in constant time; any non-ASCII input simply fails."""
    # compare_digest refuses non-ASCII str, and a header may hold any latin-1 text.
    return hmac.compare_digest(expected_hex.encode("ascii"), given.encode("latin-1", "replace"))
