"""Hypothesis strategies for sheepdog's tests, and the settings profiles.

``register_profiles()`` registers ``dev`` (quick), ``ci`` (thorough) and ``explore`` (opt-in,
random); conftest.py calls it and loads the profile named by ``SHEEPDOG_HYPOTHESIS_PROFILE``
(default dev). ``dev`` and ``ci`` are derandomized: the examples depend only on the code, so a
red CI run fails the same way on a developer's machine with ``SHEEPDOG_HYPOTHESIS_PROFILE=ci``.
``explore`` draws new examples every run and keeps failures in hypothesis' database; use it to
hunt for bugs, never in CI.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def register_profiles() -> None:
    """Register the ``dev``, ``ci`` and ``explore`` profiles (no deadline: subprocesses)."""
    settings.register_profile("dev", max_examples=50, deadline=None, derandomize=True,
                              database=None)
    settings.register_profile(
        "ci",
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "explore",
        max_examples=2000,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow],
    )


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan])
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=64)
    | st.text(max_size=32)
)

#: Any picklable value built from scalars, lists, tuples, dicts, sets and frozensets.
values = st.recursive(
    hashable_scalars | st.builds(bytearray, st.binary(max_size=16)),
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children, children)
        | st.dictionaries(hashable_scalars, children, max_size=5)
        | st.sets(hashable_scalars, max_size=5)
        | st.frozensets(hashable_scalars, max_size=5)
    ),
    max_leaves=20,
)


def canonical(value: object) -> object:
    """Return a form of ``value`` that is equal exactly when the values are identical in
    type and content: NaN equals NaN, and -0.0 differs from 0.0 (floats go by repr)."""
    kind = type(value).__name__
    if isinstance(value, (float, complex)):
        return (kind, repr(value))
    if isinstance(value, (list, tuple)):
        return (kind, tuple(canonical(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return (kind, frozenset(canonical(item) for item in value))
    if isinstance(value, dict):
        return (kind, tuple((canonical(k), canonical(v)) for k, v in value.items()))
    return (kind, value)


# ---------------------------------------------------------------------------
# Functions with closures and defaults
# ---------------------------------------------------------------------------

_OPS: dict[str, Callable[[int, int], int]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "xor": operator.xor,
}
_WAYS = ("closure", "default", "kwdefault", "recursive", "nested")

#: Steps that build a function: (operation, constant, how the constant is captured).
steps = st.lists(
    st.tuples(
        st.sampled_from(sorted(_OPS)),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(_WAYS),
    ),
    max_size=6,
)


def build_function(spec: list[tuple[str, int, str]]) -> Callable[[int], int]:
    """Build ``x -> ...`` applying each step; every step adds a closure or default."""

    def identity(x: int) -> int:
        return x

    function: Callable[[int], int] = identity
    for op, const, way in spec:
        function = _wrap(function, op, const, way)
    return function


def _wrap(g: Callable[[int], int], op: str, c: int, way: str) -> Callable[..., Any]:
    if way == "closure":
        return lambda x: _OPS[op](g(x), c)
    if way == "default":
        return lambda x, g=g, c=c: _OPS[op](g(x), c)
    if way == "kwdefault":

        def with_kwdefaults(x: int, *, g: Callable[[int], int] = g, c: int = c) -> int:
            return _OPS[op](g(x), c)

        return with_kwdefaults
    if way == "recursive":

        def repeat(n: int, acc: int) -> int:  # a local function that calls itself
            return acc if n == 0 else repeat(n - 1, _OPS[op](acc, c))

        return lambda x: repeat(2, g(x))

    def outer(x: int) -> int:
        inner = lambda y: _OPS[op](y, c)  # noqa: E731 - a nested code object with a cell
        return inner(g(x))

    return outer
