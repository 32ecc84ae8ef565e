"""Reaching a sheepdog server: an address with its port, loopback for a wildcard, the health check.

The worker stub and the doctor's probe job run on the execution nodes without
sheepdog, so they keep their own copies; everything on this side uses these.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse

__all__ = ["HEALTH_PATH", "bracketed", "health_problem", "host_port", "loopback_for"]

#: The server's unsigned liveness check (``server.routes.health``); it answers ``{"ok": true}``.
HEALTH_PATH = "/api/v1/health"


def bracketed(host: str) -> str:
    """``host`` as it goes before ``:port`` in a URL or an address: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 address in brackets: ``[::1]:8080``."""
    return f"{bracketed(host)}:{port}"


def loopback_for(host: str) -> str:
    """Where this machine reaches a server that listens on ``host``.

    A server that listens on every interface (``0.0.0.0``, ``::``, or no address)
    is asked on loopback, of the same family; any other address as it is.
    """
    if host in ("", "0.0.0.0"):  # noqa: S104 - compares, binds nothing
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def health_problem(url: str, *, timeout_s: float) -> str | None:
    """Ask the server at base ``url`` for its health check: None if it answers so, else why not.

    Sends nothing secret, so an https server's certificate is not checked: the
    workers pin it, and this only asks whether something of ours answers.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number
        return str(exc)
    if not host:
        return f"no host in {url!r}"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path.rstrip("/") + HEALTH_PATH)
        response = conn.getresponse()
        body = response.read(65536)
        if response.status != 200:
            return f"status {response.status}"
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("ok") is True:
            return None
        return f"status 200, but not a sheepdog server's answer: {body[:100]!r}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()
