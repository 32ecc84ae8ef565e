"""The HTTP server that workers call back to: a Flask app run by gunicorn in a child process.

``create_app`` builds the WSGI app for docs/protocol.rst. ``Server`` runs it
under gunicorn (gevent workers, see :mod:`.child`) in a child process on a socket
that this process binds first, so a random port has no bind-then-close race.
``get_server`` keeps one server per port, as the original did.

Authentication is per request: every call under ``/api/v1/requests/<id>/`` is
signed with that request's secret (see :mod:`.auth`), in headers that
cover the body's length and SHA-256, so no body is read before its call is
authenticated. Each ``POST`` is carried out once per nonce: a call sent again
(a worker's retry, or a replay) gets the answer recorded with its nonce. The
``password`` argument of ``Server`` and ``get_server`` is kept for the
original's signatures and registry checks only; it protects nothing.

Body size: ``DEFAULT_MAX_BODY_BYTES`` (256 MiB) bounds one JSON call's body;
larger bodies get a 413. Values longer than ``sheepdog.blobs.INLINE_MAX_BYTES``
do not travel in JSON: results are uploaded with ``PUT .../blobs/<sha256>`` and
streamed to a file beside the database (up to ``DEFAULT_MAX_BLOB_BYTES``),
arguments are sent from their file with ``GET .../tasks/<index>/args``; see
"Payloads" in docs/protocol.rst.

The modules: :mod:`.app` (``create_app``, wiring only), :mod:`.routes` (the
Blueprint of routes), :mod:`.hot_path` (the workers' frequent calls in front of
Flask), :mod:`.calls` (authentication and the calls' effects, shared by both),
:mod:`.body` (reading a signed body), :mod:`.protocol` (parsing, validation,
answers), :mod:`.auth` (signing), :mod:`.tls` (the certificate),
:mod:`.process` (``Server``, ``get_server``, ``registry``), :mod:`.child` (the
gunicorn child process that ``Server`` starts).
"""

from __future__ import annotations

from .app import create_app
from .process import Server, get_server, listen_address, registry
from .protocol import (
    BODY_BASE_S,
    BODY_MIN_BYTES_PER_S,
    CLOSE_KEY,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CLOCK_SKEW_S,
    MAX_TASKS_PER_CALL,
)

__all__ = [
    "BODY_BASE_S",
    "BODY_MIN_BYTES_PER_S",
    "CLOSE_KEY",
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "MAX_TASKS_PER_CALL",
    "Server",
    "create_app",
    "get_server",
    "listen_address",
    "registry",
]
