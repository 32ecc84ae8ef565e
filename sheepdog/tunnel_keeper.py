"""Keep the tunnel up for the requests ``sheepdog serve`` serves whose workers use it.

A request submitted with ``connect="tunnel"`` (or ``"auto"`` that chose it) has
workers that reach only the head node's relay, which went with the SSH connection of
the process that submitted it. Serving it again is not enough: the relay must run
again and the address file must name it. :class:`TunnelKeeper` opens one SSH
connection per such request (with its stored config), starts the tunnel, publishes
its address, and starts it again whenever that connection drops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from . import worker_address
from .errors import SheepdogError
from .server import Server
from .store import Storage
from .stored_request import RequestJobs, StoredRequest

__all__ = ["TunnelKeeper"]

#: A tunnel that could not start is tried again after this long (a connection attempt to
#: an unreachable head node takes its timeout: the serve loop must not do only that).
RETRY_S = 10.0
#: ... and reported at most this often.
REPORT_EVERY_S = 60.0


@dataclass
class _Kept:
    jobs: RequestJobs
    failed_at: float | None = None
    reported_at: float | None = None


class TunnelKeeper:
    """The tunnels of served requests: started, kept up, closed with :meth:`close`.

    ``say`` tells the person running ``serve`` (one line each); ``clock`` is
    ``time.monotonic`` unless a test passes a fake.
    """

    def __init__(
        self, storage: Storage, say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage, self.say, self.clock = storage, say, clock
        self._kept: dict[int, _Kept] = {}

    def add(self, request_id: int, server: Server) -> bool:
        """Keep the tunnel of ``request_id`` up if its jobs use one; True if they do."""
        request = StoredRequest(self.storage, request_id)
        if not request.uses_tunnel():
            return False
        try:
            found = request.stored_scheduler()
        except SheepdogError as exc:
            self.say(f"request {request_id}: its workers use the tunnel, which cannot start "
                     f"({exc}); they reach it only via `sheepdog attach {request_id}`")
            return True
        if found is None:
            self.say(f"request {request_id}: its workers use the tunnel, but it has no stored "
                     f"config to start one with; they reach it only via `sheepdog attach "
                     f"{request_id} --config FILE`")
            return True
        config, scheduler = found
        self._kept[request_id] = _Kept(RequestJobs(request, config, scheduler, server))
        self.keep(request_id)
        return True

    def keep(self, request_id: int | None = None) -> None:
        """Start each kept tunnel (or ``request_id``'s) that is down, and publish its address."""
        for rid in [request_id] if request_id is not None else list(self._kept):
            kept = self._kept.get(rid)
            now = self.clock()
            if kept is None or (kept.failed_at is not None and now - kept.failed_at < RETRY_S):
                continue
            try:
                where = worker_address.ensure_tunnel(kept.jobs)
            except SheepdogError as exc:
                kept.failed_at = now
                if kept.reported_at is None or now - kept.reported_at >= REPORT_EVERY_S:
                    kept.reported_at = now
                    self.say(f"request {rid}: the tunnel is down and could not start: {exc}; "
                             "retrying")
                continue
            kept.failed_at = None
            if where is not None:
                kept.reported_at = None
                self.say(f"request {rid}: the tunnel is up; its workers find the relay at "
                         f"{where[0]}:{where[1]}")

    def drop(self, request_id: int) -> None:
        """Stop keeping ``request_id``'s tunnel (it is finished) and close its connection."""
        kept = self._kept.pop(request_id, None)
        if kept is not None:
            kept.jobs.scheduler.close()

    def close(self) -> None:
        """Close every connection: the relays on the head node see EOF and exit."""
        for rid in list(self._kept):
            self.drop(rid)
