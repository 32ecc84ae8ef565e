"""The environment on the nodes against this machine's: module versions, compared.

Workers report their Python and the modules their function's payload names (with
each one's version) once, with their first lease (docs/protocol.rst); ``sheepdog
doctor --check`` asks the probe job the same. Both are compared here with what
this machine has, using the worker stub's own ``module_version``, so that both
sides find a version the same way.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .client import stub

__all__ = ["Comparison", "compare", "local_versions", "mismatch_warning", "payload_modules"]

#: A module's state on one side: [imports, version] or [False, why not].
State = Sequence[Any]


def local_versions(names: Iterable[str]) -> dict[str, list[Any]]:
    """Whether each module imports here, and its version (the stub's rule)."""
    return {name: list(stub.module_version(name)) for name in names}


def payload_modules(payload: bytes) -> list[str]:
    """The top-level modules a function payload names (loading it here imports them)."""
    modules: set[str] = set()
    stub.load_function(payload, modules)
    return sorted(stub.environment(modules)["modules"])


class Comparison:
    """One module on the node against here: ``status`` ok, warn (versions differ) or
    missing (does not import on the node; a blocker)."""

    def __init__(self, name: str, there: State, here: State) -> None:
        self.name = name
        self.there, self.here = list(there), list(here)

    @property
    def status(self) -> str:
        if not self.there[0]:
            return "missing"
        if self.here[0] and self.there[1] != self.here[1]:
            return "warn"
        return "ok"

    def describe(self, node: str) -> str:
        """``numpy 1.26.4 on node1, 1.24.0 here`` and the like, for a report line."""
        here = (f"{self.here[1] or 'no version'} here" if self.here[0]
                else f"not importable here ({self.here[1]})")
        if not self.there[0]:
            return f"{self.name}: missing on {node} ({self.there[1]}); {here}"
        there = self.there[1] or "no version"
        return f"{self.name}: {there} on {node}, {here}"


def compare(
    there: Mapping[str, State], here: Mapping[str, State] | None = None
) -> list[Comparison]:
    """Each module the node reported, against this machine, by name."""
    here = local_versions(there) if here is None else here
    return [Comparison(name, there[name], here.get(name, [False, "not checked"]))
            for name in sorted(there)]


def mismatch_warning(
    request_id: int, reports: list[dict[str, Any]],
    here: Callable[[Iterable[str]], dict[str, list[Any]]] = local_versions,
) -> str | None:
    """The one warning for a request whose workers' modules differ from this machine's.

    Each mismatched module is named once, with the version here and each version
    the workers reported (and on which host); None when all agree.
    """
    names = sorted({name for report in reports for name in report["modules"]})
    mine = here(names)
    seen: dict[str, list[str]] = {}
    for report in reports:
        for c in compare(report["modules"], mine):
            if c.status != "ok":
                line = c.describe(f"{report['host']} (Python {report['python']})")
                if line not in seen.setdefault(c.name, []):
                    seen[c.name].append(line)
    if not seen:
        return None
    lines = [line for name in sorted(seen) for line in seen[name]]
    return (f"request {request_id}: the workers' modules differ from this machine's "
            f"(Python {platform.python_version()}): " + "; ".join(lines)
            + "; install the same versions on the nodes (or in the config's prologue)")
