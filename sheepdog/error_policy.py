"""What ``map(..., errors=...)`` does with failed tasks: the values of ``errors``.

Users pass the plain strings (``errors="raise"``); :meth:`ErrorPolicy.parse`
turns them into a member or refuses them naming the valid ones.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ErrorPolicy"]


class ErrorPolicy(str, Enum):
    """``none`` (a failed task's result is ``None``) or ``raise`` (a TaskFailedError).

    A ``str``: equal to the text users pass, and written as that text (f-strings).
    """

    NONE = "none"
    RAISE = "raise"

    def __str__(self) -> str:
        # Messages name the policy as users write it (errors=raise), on every Python:
        # 3.12 formats a mixed-in Enum with str(), older ones with the value.
        return str(self.value)

    @classmethod
    def parse(cls, errors: object) -> ErrorPolicy:
        """Return the policy ``errors`` names; refuse any other value, naming the valid ones."""
        # Compared as text only: ErrorPolicy(True) must not be looked up, nor 1 == True match.
        if isinstance(errors, str):
            for policy in cls:
                if errors == policy.value:
                    return policy
        valid = " or ".join(repr(policy.value) for policy in cls)
        raise ValueError(f"errors must be {valid}, got {errors!r}")
