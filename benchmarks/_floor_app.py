"""A WSGI app that does no work: what gunicorn alone costs per round trip.

``benchmarks.server_throughput`` runs it under gunicorn with the server's
settings (gthread, 2 workers x 4 threads, keep-alive) and the same load: the
server CPU per round trip it measures is the floor under any app served so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["app"]

#: About the size of a one-task answer to a results call.
ANSWER = (
    b'{"accepted":[1],"duplicates":[],"tasks":[{"index":2,"attempt":1,'
    b'"lease":"0123456789abcdef","args":"gASVAgAAAAAAAABLAi4="}],"lease_s":120.0,'
    b'"state":"open"}'
)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Read the body, answer a fixed JSON body with a signature-sized header."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER))),
        ("X-Sheepdog-Signature", "0" * 64),
    ])
    return [ANSWER]
