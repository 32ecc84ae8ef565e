"""The gunicorn internals that sheepdog's server relies on are there, and take what it gives.

sheepdog/server/child.py's ``Worker`` overrides ``GeventWorker.patch`` (its copy of how
gunicorn makes the listening sockets cooperative), ``init_process`` and ``run``;
``_Application`` sets gunicorn settings by name; ``_closing_app`` calls the response's
``force_close`` through ``start_response``; and sheepdog/server/body.py reads the request
body's reader (``wsgi.input``'s ``reader.length``, ``reader.unreader`` and ``buf``) and the
``gunicorn.socket`` environ key. None of that is gunicorn's public API, so pyproject.toml
pins gunicorn to the releases it was checked on: the server tests (tests/server) passed on
25.1.0 (the first with ``control_socket_disable``), 26.1.0 and 27.0.1. A gunicorn that
changes one of these fails here, naming it, before a server misbehaves.
"""

from __future__ import annotations

import argparse
import inspect
import io
import time

import gunicorn
import pytest
from gunicorn.app.base import BaseApplication
from gunicorn.http import wsgi
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import IterUnreader, Unreader
from gunicorn.sock import TCPSocket
from gunicorn.workers.ggevent import GeventWorker

from sheepdog.server import child

FIX = (f"sheepdog/server/child.py (or body.py) relies on it: check that code against gunicorn "
       f"{gunicorn.__version__}, then move the gunicorn pin in pyproject.toml")


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["patch", "init_process", "run"])
def test_the_gevent_worker_has_the_methods_the_worker_overrides(name: str) -> None:
    method = getattr(GeventWorker, name, None)
    assert callable(method), f"gunicorn's GeventWorker has no method {name}(); {FIX}"
    assert _parameters(method) == ["self"], (
        f"gunicorn's GeventWorker.{name} takes {_parameters(method)}, not (self); {FIX}")


def test_the_gevent_worker_makes_its_sockets_cooperative_in_patch() -> None:
    # Worker.patch replaces GeventWorker.patch whole: it must still be where the listening
    # sockets (self.sockets, each with FAMILY and the socket in .sock) become gevent's.
    called = inspect.getsource(GeventWorker.init_process)
    assert "self.patch()" in called, (
        f"gunicorn's GeventWorker.init_process no longer calls self.patch(); {FIX}")
    source = inspect.getsource(GeventWorker.patch)
    for used in ("self.sockets", "s.FAMILY", "s.sock.detach()"):
        assert used in source, (
            f"gunicorn's GeventWorker.patch no longer uses {used}, which Worker.patch "
            f"copies; {FIX}")
    assert isinstance(TCPSocket.FAMILY, int), f"gunicorn's TCPSocket has no FAMILY; {FIX}"
    assert "self.sock = " in inspect.getsource(TCPSocket.__mro__[1].__init__), (
        f"gunicorn's listening socket no longer holds its socket in .sock; {FIX}")


def test_every_setting_the_server_gives_gunicorn_is_known_to_it() -> None:
    args = argparse.Namespace(fd=3, workers=2, log_level="warning", certfile=None,
                              keyfile=None, parent_pid=1)
    assert _parameters(BaseApplication.__init__) == ["self", "usage", "prog"], (
        f"gunicorn's BaseApplication.__init__ takes {_parameters(BaseApplication.__init__)}; "
        f"{FIX}")
    try:
        application = child._Application(args)  # sets each setting: unknown ones raise
    except AttributeError as exc:
        pytest.fail(f"gunicorn refuses a setting of _Application.load_config: {exc}; {FIX}")
    cfg = application.cfg
    assert cfg.worker_class is child.Worker
    assert cfg.keepalive == child.HEADERS_WITHIN_S
    assert cfg.worker_connections == child.WORKER_CONNECTIONS
    assert cfg.control_socket_disable is True
    assert cfg.bind == ["fd://3"]
    assert callable(cfg.when_ready)


def test_the_response_closes_its_connection_on_request() -> None:
    assert _parameters(wsgi.Response.force_close) == ["self"], (
        f"gunicorn's Response.force_close is gone or takes arguments; {FIX}")
    assert _parameters(wsgi.Response.start_response) == [
        "self", "status", "headers", "exc_info"], (
        f"gunicorn's Response.start_response takes "
        f"{_parameters(wsgi.Response.start_response)}; {FIX}")
    assert '"gunicorn.socket"' in inspect.getsource(wsgi), (
        f"gunicorn no longer puts the connection's socket in environ['gunicorn.socket']; {FIX}")


def test_a_body_of_known_length_is_read_through_the_reader_body_py_looks_at() -> None:
    unreader = IterUnreader([b"hello"])
    body = Body(LengthReader(unreader, 5))
    assert body.reader.length == 5, f"gunicorn's LengthReader has no .length; {FIX}"
    assert body.reader.unreader is unreader, f"gunicorn's LengthReader has no .unreader; {FIX}"
    assert isinstance(body.buf, io.BytesIO), f"gunicorn's Body holds no BytesIO .buf; {FIX}"
    assert body.read() == b"hello"
    # _body_unread: a body the app read to its end leaves no length in its reader.
    assert body.reader.length == 0, f"gunicorn's LengthReader.length is not what is left; {FIX}"


def test_the_bytes_an_unreader_holds_are_taken_without_a_read_where_gunicorn_offers_it() -> None:
    # body.py reads a large body straight from the socket when the unreader can hand over
    # what it holds (take_buffered, gunicorn 27); without it, it reads through gunicorn.
    take = getattr(Unreader, "take_buffered", None)
    if take is None:
        assert int(gunicorn.__version__.split(".")[0]) < 27, (
            f"gunicorn's Unreader.take_buffered is gone; {FIX}")
        return
    assert _parameters(take) == ["self"], (
        f"gunicorn's Unreader.take_buffered takes arguments; {FIX}")
    unreader = IterUnreader([b"abcdef"])
    assert unreader.read(2) == b"ab"
    assert unreader.take_buffered() == b"cdef"


def test_the_response_takes_its_date_from_util_http_date() -> None:
    # child._date_once_a_second replaces gunicorn.util.http_date: the response must call it
    # by that name, with no argument, for the cached text to be used.
    source = inspect.getsource(wsgi.Response.default_headers)
    assert "util.http_date()" in source, (
        f"gunicorn's Response.default_headers no longer calls util.http_date(); {FIX}")


def test_the_cached_date_is_gunicorns_text() -> None:
    from gunicorn import util

    formatted = util.http_date
    try:
        child._date_once_a_second()
        assert util.http_date is not formatted
        assert util.http_date(0) == formatted(0)
        assert util.http_date() in (formatted(), formatted(time.time() - 1))
    finally:
        util.http_date = formatted


def test_settled_settings_read_as_gunicorn_would() -> None:
    # child._settle_settings copies each setting into the Config's __dict__, which an
    # attribute read finds before Config.__getattr__: that must give the same values.
    from gunicorn.config import Config

    assert "__getattribute__" not in vars(Config), (
        f"gunicorn's Config overrides __getattribute__; {FIX}")
    cfg = Config()
    cfg.set("keepalive", 7)
    before = {name: getattr(cfg, name) for name in cfg.settings}
    child._settle_settings(cfg)
    assert {name: getattr(cfg, name) for name in cfg.settings} == before
    assert cfg.keepalive == 7
    assert vars(cfg)["keepalive"] == 7
