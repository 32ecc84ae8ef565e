"""A clock that moves only when a test says: for code that takes ``clock=`` or uses ``time``."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds from 1000 that move only by :meth:`advance` (or a fake ``sleep``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    # As the ``time`` module, for code whose module-level ``time`` a test replaces: its
    # sleep passes at once, and moves the clock on.
    monotonic = __call__
    sleep = advance
