"""The workers' way back to the server: where they reach it, published in their address file.

Workers read the address file at every reconnection, so :func:`publish_address` and
:func:`ensure_tunnel` move them (to the tunnel, or to a relay started again) while
their jobs run.
"""

from __future__ import annotations

from . import tunnel
from .config import Config
from .connect import ConnectMode
from .errors import ServerError
from .job_file import ADDRESS_FILE_MODE, address_file_name
from .net import host_port, loopback_for
from .scheduler import Scheduler
from .server import Server
from .stored_request import RequestJobs

__all__ = ["address_line", "ensure_tunnel", "publish_address", "server_port", "worker_address"]


def address_line(host: str, port: int) -> str:
    """The address file's text: ``host:port``, an IPv6 address in brackets."""
    return host_port(host, port) + "\n"


def _local_target(server: Server) -> tuple[str, int]:
    """Where this process reaches its own server (for the tunnel's forwarded connections)."""
    return loopback_for(server.host or ""), server_port(server)


def server_port(server: Server) -> int:
    """The running server's port (a started server always has one)."""
    if server.port is None:
        raise ServerError("the server has no port: it was never started")
    return server.port


def worker_address(
    config: Config, scheduler: Scheduler, server: Server, mode: ConnectMode, *, tasks: int = 0
) -> tuple[str, int]:
    """Where workers reach ``server`` in ``mode``: ``localhost``:port, or the tunnel's relay.

    ``tasks``: the array tasks about to be submitted, for the relay's connection cap.
    """
    return tunnel.worker_address(
        mode, scheduler.host, server_port(server), lambda: _local_target(server),
        (config.localhost, server_port(server)), relay_address=config.relay_address,
        connections_per_task=config.relay_connections_per_task, tasks=tasks,
    )


def publish_address(jobs: RequestJobs, mode: ConnectMode) -> tuple[str, int]:
    """Write where workers reach the server now (``mode``) into the request's address file.

    Workers read it at every reconnection, so moving to the tunnel, or a relay started
    again on another port, costs them one retry. Returns the address written.
    """
    config, scheduler = jobs.config, jobs.scheduler
    host, port = worker_address(config, scheduler, jobs.running_server(), mode)
    name = address_file_name(jobs.request_id, jobs.storage.get_secret(jobs.request_id))
    scheduler.host.put(config.ssh_dir, [(name, address_line(host, port), ADDRESS_FILE_MODE)])
    return host, port


def ensure_tunnel(jobs: RequestJobs) -> tuple[str, int] | None:
    """Start the tunnel to ``server`` if it is down, and publish the relay's address.

    For a request whose workers go through the tunnel and whose tunnel went with an SSH
    connection (dropped, or closed with the process that held it: a laptop that slept).
    Workers read the address file at their next retry. Returns the address published,
    or None when the tunnel was up. Raises SSHError when it cannot start.
    """
    if tunnel.is_up(jobs.scheduler.host, server_port(jobs.running_server())):
        return None
    return publish_address(jobs, ConnectMode.TUNNEL)
