"""The server a config's workers call back to: how it listens, and the running one."""

from __future__ import annotations

import os
from typing import Any

from .config import Config
from .errors import ServerError
from .server import Server, get_server, listen_address, registry
from .server.tls import certificate_for

__all__ = ["server_for", "server_key", "server_options"]


def server_options(config: Config, host: str | None = None) -> dict[str, Any]:
    """How the config's server listens: on ``host`` (default: where the config says), with
    its certificate under ``tls``."""
    options: dict[str, Any] = {}
    if config.tls:
        files = certificate_for(config.dbfile)
        options = {"certfile": files.certfile, "keyfile": files.keyfile}
    options["host"] = host or config.listen_address or listen_address(config.localhost)
    if config.max_blob_bytes is not None:
        options["max_blob_bytes"] = config.max_blob_bytes
    return options


def server_key(config: Config) -> tuple[str, bool]:
    """The registry's key of the config's random-port server: one per database and TLS setting.

    HTTP and HTTPS servers on one database may run side by side.
    """
    return (os.path.abspath(config.dbfile), config.tls)


def server_for(config: Config) -> Server:
    """The running server for the config: its fixed port, or one random-port server per dbfile.

    The original's ``get_server(None, ...)`` keeps one server for every
    ``port=None`` call and refuses another database; maps with different
    dbfiles in one process must just work, so each database gets its own
    (kept in :data:`sheepdog.server.registry`, the one registry).
    """
    options = server_options(config)
    if config.port is not None:
        fixed = get_server(config.port, None, config.dbfile, **options)
        if (fixed.scheme == "https") != config.tls:
            raise ServerError(
                f"the server on port {config.port} serves {fixed.scheme}, but this config has "
                f"tls={config.tls}; use another port or the same tls setting"
            )
        return fixed
    return registry.share(server_key(config), lambda: Server(None, None, config.dbfile, **options))
