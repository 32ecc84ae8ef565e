"""``sheepdog.storage``, where Sheepdog 0.2 documented ``Storage``: the store's names.

The store itself is the :mod:`sheepdog.store` package; this module keeps the
0.2 import path (``from sheepdog.storage import Storage``) working.
"""

from __future__ import annotations

from .store import (
    DB_FILE_MODE,
    DEFAULT_SETTINGS,
    OPEN_STATES,
    RERUN_CHOICES,
    SCHEMA_VERSION,
    CallAuth,
    Lease,
    NonceReusedError,
    Storage,
    content_digest,
)

__all__ = [
    "DB_FILE_MODE",
    "DEFAULT_SETTINGS",
    "OPEN_STATES",
    "RERUN_CHOICES",
    "SCHEMA_VERSION",
    "CallAuth",
    "Lease",
    "NonceReusedError",
    "Storage",
    "content_digest",
]
