"""How workers reach this machine's server: the values of the ``connect`` key.

One place for the three modes, below the config and the store: a config's
``connect`` is compared with them, and the mode a request's jobs were submitted
with is recorded with the jobs (:class:`~sheepdog.store.records.JobRecord`).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ConnectMode"]


class ConnectMode(str, Enum):
    """``direct``, ``tunnel`` or ``auto`` (see docs/connecting.rst).

    A ``str``: equal to the text users write in configs and that the database
    stores, and written as that text (``json.dumps``, f-strings).
    """

    DIRECT = "direct"
    TUNNEL = "tunnel"
    AUTO = "auto"

    def __str__(self) -> str:
        # Messages name the mode as the config key's value (connect=tunnel), on every
        # Python: 3.12 formats a mixed-in Enum with str(), older ones with the value.
        return self.value
