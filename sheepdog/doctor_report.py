"""What ``sheepdog doctor`` found: each check's verdict, what it saw and the fix, as text.

Part of :mod:`sheepdog.doctor`, which re-exports :class:`Check` and :class:`Report`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

__all__ = ["COLUMNS", "FAIL", "OK", "SKIPPED", "WARN", "Check", "Report", "render_check"]

#: Columns the report keeps to, and where a check's words start.
COLUMNS = 80
_LABEL_COLUMNS = 15

OK, WARN, FAIL, SKIPPED = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    """One thing :func:`doctor` looked at: its verdict, what it found, and the fix."""

    name: str
    #: ``ok``, ``warn`` (works, but read this), ``FAIL`` (a blocker) or ``skip`` (not checked).
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Every check :func:`doctor` made, in order; ``ok`` when none is a blocker."""

    target: str
    checks: list[Check] = field(default_factory=list)

    @property
    def blockers(self) -> list[Check]:
        """The checks that stop maps from working."""
        return [check for check in self.checks if check.status == FAIL]

    @property
    def ok(self) -> bool:
        """True when maps with this config can work: no blocker."""
        return not self.blockers

    def summary(self) -> str:
        """The last line: the verdict."""
        if self.ok:
            return f"sheepdog doctor: {self.target}: ready, no blockers"
        n = len(self.blockers)
        return (f"sheepdog doctor: {self.target}: {n} blocker{'s' if n > 1 else ''} (FAIL "
                "above); fix and run it again")

    def render(self) -> str:
        """The report as text for an 80-column terminal, one check after another."""
        return "\n".join([*(render_check(check) for check in self.checks), self.summary()])


def render_check(check: Check) -> str:
    """One check as lines of at most 80 columns: verdict, name, what it found, the fix."""
    indent = " " * (6 + _LABEL_COLUMNS)
    first = f"{check.status:<6}{check.name:<{_LABEL_COLUMNS}}"
    lines = textwrap.wrap(check.detail, COLUMNS, initial_indent=first, subsequent_indent=indent,
                          break_on_hyphens=False) or [first.rstrip()]
    if check.fix:
        lines += textwrap.wrap(check.fix, COLUMNS, initial_indent=indent + "fix: ",
                               subsequent_indent=indent + "     ", break_on_hyphens=False)
    return "\n".join(lines)
