"""Answer the workers' ``lease``, ``heartbeat`` and ``results`` POSTs in front of Flask.

Flask's request context, routing, and request and response objects cost
about as much server CPU as the rest of a round trip's Python together
(docs/benchmarks.rst); these three calls are nearly every round trip. The
hot path matches their paths itself and calls :func:`.calls.carry_out`, as
their Blueprint routes do, in a :func:`.calls.scope` rather than an app
context (the settings, and the request's SQLite connection: pushing and
popping an app context cost about 5 % of the server's CPU per round trip);
everything else goes to Flask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Callable

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from .body import Environ
from .calls import ACTIONS, EXTENSION, AppState, carry_out, scope

__all__ = ["HotPath"]

#: The paths the hot path answers. Ids with a leading zero or of 20 digits or more
#: take Flask's route, as before.
_HOT_PATH = re.compile(rf"/api/v1/requests/([1-9][0-9]{{0,18}})/({'|'.join(ACTIONS)})")
_STATUS_LINES = {code: f"{code} {phrase}" for code, phrase in HTTP_STATUS_CODES.items()}

WsgiApp = Callable[[Environ, Callable[..., Any]], Iterable[bytes]]


class HotPath:
    """A WSGI app: the workers' POSTs answered here, every other call passed to ``flask_wsgi``."""

    def __init__(self, app: Flask, flask_wsgi: WsgiApp) -> None:
        self.app = app
        self.flask_wsgi = flask_wsgi
        self.settings: AppState = app.extensions[EXTENSION]

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        match = _HOT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None or environ.get("REQUEST_METHOD") != "POST":
            return self.flask_wsgi(environ, start_response)
        with scope(self.settings):
            status, headers, body = carry_out(environ, match[0], int(match[1]), match[2])
        start_response(_STATUS_LINES[status], headers)
        return [body]
