"""The dashboard's pages as a Flask Blueprint, and :func:`create_app` that serves them.

Read-only: every request opens the database as a reader (never creating it)
with SQLite's ``query_only`` on. Every request must come from a loopback
address, name this machine's loopback in its ``Host`` header (a page of
another site cannot rebind its name to us) and carry the token, as Jupyter's
pages do; anything else gets a 403 before the database is touched.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, render_template, request
from markupsafe import Markup

from ..errors import StorageError, UnknownRequestError
from ..store import Storage
from .data import request_detail, request_summaries, request_summary
from .svg import COLOURS, progress_html, throughput_svg, timeline_svg

__all__ = ["TOKEN_PARAM", "bp", "create_app"]

#: The query parameter that carries the token.
TOKEN_PARAM = "token"  # noqa: S105 - a parameter's name, not a secret
#: Names a browser may use for the dashboard's own address.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
#: Seconds between two looks of a live page at the request's counts.
POLL_S = 2.0

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")

_HEADERS = {
    # Scripts and styles only from here, no frames, no referrer (it would carry the token).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _refuse(why: str) -> Response:
    response = jsonify(error="forbidden", message=why)
    response.status_code = 403
    return response


def _host_allowed(host: str, port: str) -> bool:
    name, _, given_port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    return name in LOOPBACK_NAMES and given_port in ("", port)


@bp.before_app_request
def _guard() -> Response | None:
    """Refuse what is not from this machine, or lacks the token; first, before any work."""
    remote = request.remote_addr or ""
    try:
        loopback = ipaddress.ip_address(remote).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return _refuse(f"the dashboard answers this machine only, not {remote or 'unknown'}")
    if not _host_allowed(request.host, str(request.environ.get("SERVER_PORT", ""))):
        return _refuse(f"the dashboard answers as 127.0.0.1 only, not as {request.host}")
    given = request.args.get(TOKEN_PARAM, "")
    if not hmac.compare_digest(given.encode(), current_app.config["DASHBOARD_TOKEN"].encode()):
        return _refuse("missing or wrong token: open the URL `sheepdog dashboard` printed")
    return None


@bp.after_app_request
def _secure(response: Response) -> Response:
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@contextmanager
def _reader() -> Iterator[Storage]:
    """The database as a reader: never created, never migrated here, never written."""
    storage = Storage(current_app.config["DASHBOARD_DBFILE"], create=False, init=False,
                      write_queue=False)
    try:
        storage.conn.execute("PRAGMA query_only = ON")
        yield storage
    finally:
        storage.close()


def _token() -> str:
    return str(current_app.config["DASHBOARD_TOKEN"])


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%m-%d %H:%M:%S", time.localtime(t))


def _elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _context() -> dict[str, Any]:
    return {"token": _token(), "when": _when, "elapsed": _elapsed, "colours": COLOURS,
            "dbfile": current_app.config["DASHBOARD_DBFILE"], "poll_ms": int(POLL_S * 1000)}


@bp.route("/")
def requests_page() -> str:
    with _reader() as storage:
        rows = request_summaries(storage)
    return render_template("dashboard/requests.html", rows=rows, **_context())


def _detail(request_id: int) -> Any:
    with _reader() as storage:
        try:
            return request_detail(storage, request_id)
        except UnknownRequestError:
            abort(404, f"no request {request_id} in {storage.dbfile}")


def _charts(detail: Any) -> dict[str, Markup]:
    s = detail.summary
    return {
        "progress": Markup(progress_html(s.counts, s.n_tasks)),  # noqa: S704 - built with every text escaped
        "timeline": Markup(timeline_svg(detail.timeline)),  # noqa: S704 - built with every text escaped
        "throughput": Markup(throughput_svg(detail.timeline)),  # noqa: S704 - built with every text escaped
    }


@bp.route("/requests/<int:request_id>")
def request_page(request_id: int) -> str:
    detail = _detail(request_id)
    return render_template("dashboard/request.html", d=detail, s=detail.summary,
                           **_charts(detail), **_context())


@bp.route("/requests/<int:request_id>/charts")
def charts(request_id: int) -> str:
    """The progress bar, timeline and throughput alone, for a live page to swap in."""
    detail = _detail(request_id)
    return render_template("dashboard/charts.html", d=detail, s=detail.summary,
                           **_charts(detail), **_context())


@bp.route("/requests/<int:request_id>/progress")
def progress(request_id: int) -> Response:
    """The request's state and counts: what a live page polls, a few hundred bytes."""
    with _reader() as storage:
        try:
            summary = request_summary(storage, request_id)
        except UnknownRequestError:
            abort(404, f"no request {request_id} in {storage.dbfile}")
    return jsonify(id=summary.id, state=summary.state, counts=summary.counts,
                   n_tasks=summary.n_tasks, elapsed=_elapsed(summary.elapsed_s),
                   finished=_when(summary.finished))


def _not_found(exc: Exception) -> tuple[Response, int]:
    return jsonify(error="not_found", message=getattr(exc, "description", str(exc))), 404


def create_app(dbfile: str | Path, token: str) -> Flask:
    """The dashboard app on ``dbfile``, answering requests that carry ``token``.

    The database must exist (a reader never creates one): a StorageError says so.
    """
    dbfile = str(dbfile)
    if len(token) < 16:
        raise ValueError("the dashboard's token needs at least 16 characters")
    Storage(dbfile, create=False).close()  # exists, and has the current schema
    app = Flask("sheepdog.dashboard", static_folder=None)
    app.config.update(DASHBOARD_DBFILE=dbfile, DASHBOARD_TOKEN=token)
    app.register_blueprint(bp)
    app.register_error_handler(404, _not_found)
    app.register_error_handler(StorageError, lambda exc: (
        jsonify(error="storage", message=str(exc)), 500))
    return app
