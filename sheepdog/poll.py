"""Wait until a condition holds, asking again with a growing interval, within a bound."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["poll_until"]


def poll_until(
    done: Callable[[], bool],
    *,
    timeout_s: float | None,
    interval_s: float = 0.2,
    max_interval_s: float | None = None,
    backoff: float = 1.5,
) -> bool:
    """Call ``done`` until it returns True (then return True) or ``timeout_s`` passes (False).

    ``done`` is called at once, then after ``interval_s``, which grows by
    ``backoff`` up to ``max_interval_s`` (default: it does not grow). The last
    call comes no later than the deadline; ``timeout_s=None`` waits as long as
    it takes, which only a caller that can be interrupted should ask for.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ceiling = interval_s if max_interval_s is None else max_interval_s
    while True:
        if done():
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        pause = interval_s if deadline is None else min(interval_s, deadline - now)
        time.sleep(pause)
        interval_s = min(ceiling, interval_s * backoff)
