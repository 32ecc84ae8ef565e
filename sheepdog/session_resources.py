"""A session's lifecycle and what it owns: the store, scheduler, server and job directory.

Part of :class:`~sheepdog.session.Session`. Constructing has no side effects,
:meth:`Resources.start` (or ``with``) opens the scheduler, then the database,
``with`` cleans up when starting fails halfway, and :meth:`Resources.close` is safe
to call twice.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING

from . import tunnel
from .config import Config, ConfigLike, as_config
from .errors import SheepdogError
from .scheduler import Deletion, Scheduler, check_options, open_scheduler
from .server import Server, registry
from .server_for import server_for, server_key, server_options
from .store import Storage
from .stored_request import StoredRequest

if TYPE_CHECKING:
    from typing_extensions import Self  # typing's own from Python 3.11

__all__ = ["Resources"]

# The name it had before Session was split: a user's logging configuration may name it.
logger = logging.getLogger("sheepdog.session")

class Resources:
    """Open and close one database's store, scheduler and server, and hand them out."""

    def __init__(
        self,
        config: ConfigLike | None = None,
        *,
        dbfile: str | None = None,
        scheduler: Scheduler | None = None,
        create: bool = True,
    ) -> None:
        self._config = None if config is None else as_config(config)
        if dbfile is None:
            if self._config is None:
                raise ValueError("a Session needs a config or a dbfile")
            dbfile = self._config.dbfile
        self.dbfile = dbfile
        self._create = create
        self._given = scheduler
        self._scheduler: Scheduler | None = None
        self._storage: Storage | None = None
        self._server: Server | None = None
        self._jobdir: str | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<Session dbfile={self.dbfile!r} {self._state}>"

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        """Open the scheduler (it connects on first use), then the database; return self."""
        if self._state == "closed":
            raise RuntimeError(f"{self!r} was closed; make a new Session")
        if self._state == "new":
            if self._config is not None and self._scheduler is None:
                # First: a bad ssh_keyfile is refused before the database is even created.
                # Opening connects to nothing yet; that waits for the first command.
                if self._given is not None:
                    # Opened elsewhere (rerun's, a test's): its option rules hold all the same.
                    check_options(self._config)
                self._scheduler = self._given or open_scheduler(self._config)
            self._storage = Storage(self.dbfile, create=self._create)
            self._state = "open"
        return self

    def close(self) -> None:
        """Close the database and the scheduler this session opened; safe to call twice.

        The server keeps running for this database's other maps (it stops at exit).
        """
        self._state = "closed"
        storage, self._storage = self._storage, None
        scheduler, self._scheduler = self._scheduler, None
        try:
            if storage is not None:
                storage.close()
        finally:
            # A connection held open for map_async's tunnel stays open until the process exits.
            if (scheduler is not None and scheduler is not self._given
                    and not tunnel.is_held(scheduler.host)):
                scheduler.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what it owns ---------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config maps are submitted with (a reading session has none)."""
        if self._config is None:
            raise RuntimeError(f"{self!r} was opened with a dbfile only: it cannot submit")
        return self._config

    @property
    def storage(self) -> Storage:
        """The session's one database connection."""
        if self._storage is None:
            raise RuntimeError(f"{self!r} is not started: use it in a with block")
        return self._storage

    @property
    def scheduler(self) -> Scheduler:
        """The config's scheduler (for Grid Engine, an SSH connection made on first use)."""
        if self._scheduler is None:
            if self._storage is None:
                raise RuntimeError(f"{self!r} is not started: use it in a with block")
            self._scheduler = self._given or open_scheduler(self.config)
        return self._scheduler

    @property
    def server(self) -> Server:
        """The running server the workers call back to (started again if it died)."""
        if self._server is None:
            self._server = server_for(self.config)
        else:
            self._server.ensure_running()
        return self._server

    def serve_again(self, request_id: int) -> Server:
        """The server for a request's job files: on the port they call back to, if it can be.

        This process's own server on that port if it runs one; else one started again
        there, where the last one listened, which the session serves from then on. If that
        port is taken (another process serves it, or something else took it), or the
        config fixes a port, the config's server: jobs resubmitted from here call that one.
        """
        cfg, request = self.config, self.request(request_id)
        own = request.own_server()
        if own is not None:
            self._server = own
            return own
        latest = request.latest_job()
        port = None if latest is None else latest.port
        address = None if latest is None else latest.listen_address
        if port and address and cfg.port is None:
            options = server_options(cfg, host=address)
            try:
                server = Server(port, None, cfg.dbfile, **options)
            except SheepdogError as exc:
                logger.warning(
                    "request %d: cannot serve again on port %s (%s); its running array tasks "
                    "cannot report here, resubmitted ones will", request_id, port, exc,
                )
            else:
                # submit_request finds it there: resubmitted jobs call this same server.
                registry.adopt(server_key(cfg), server)
                self._server = server
                return server
        return self.server

    def request(self, request_id: int) -> StoredRequest:
        """The stored request ``request_id`` in this session's database."""
        return StoredRequest(self.storage, request_id)

    @property
    def jobdir(self) -> str:
        """``ssh_dir`` made absolute on the scheduler's host: resolved once per session."""
        if self._jobdir is None:
            self._jobdir = self.scheduler.host.absolute(self.config.ssh_dir)
        return self._jobdir

    def _adopt(self, config: Config) -> None:
        if self._scheduler is not None and self._scheduler is not self._given:
            self._scheduler.close()
            self._scheduler = None
        self._config, self._server, self._jobdir = config, None, None

    def _delete(self, scheduler: Scheduler, request_id: int) -> Deletion:
        return self.request(request_id).delete_jobs(scheduler)

