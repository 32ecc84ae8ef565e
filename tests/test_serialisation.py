"""Tests of sheepdog.serialisation and the stub's decoder (library side and subprocess)."""

from __future__ import annotations

import io
import json
import math
import os.path
import pickle
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from os.path import join
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_function, canonical, steps, values
from stubrunner import StubError, StubProcess

import sheepdog.serialisation as s
from sheepdog.errors import SerialisationError

SCALE = 10
LOCK = threading.Lock()


def helper(x: float) -> float:
    return x * SCALE


def uses_helper(x: float) -> float:
    """Doubles via a helper."""
    return helper(x) + 1


def fact(n: int) -> int:
    return 1 if n <= 1 else n * fact(n - 1)


def is_even(n: int) -> bool:
    return True if n == 0 else is_odd(n - 1)


def is_odd(n: int) -> bool:
    return False if n == 0 else is_even(n - 1)


def root_late(x: float) -> float:
    return _late_math.sqrt(x)  # type: ignore[name-defined]  # noqa: F821


def imports_then_calls(x: float) -> float:
    global _late_math
    import math as _late_math

    return root_late(x)


def seed_idiom(x: float) -> float:
    import math as _late_math  # Sheepdog 0.2's documented order

    global _late_math  # noqa: F811
    return root_late(x)


def uses_modules(x: float) -> str:
    return join(str(math.sqrt(x)), os.path.basename("/a/b"))


def with_defaults(a: int, b: int = 2, *, c: int = 3) -> tuple[int, int, int]:
    return (a, b, c)


def nested_global(x: int) -> list[int]:
    return [SCALE + y for y in range(x)]  # SCALE is read only by the comprehension's code


def uses_lock(x: int) -> int:
    with LOCK:
        return x


def make_closures() -> dict[str, Callable[..., Any]]:
    offset = 5

    def local_fact(n: int) -> int:  # a cyclic closure: its cell holds itself
        return 1 if n <= 1 else n * local_fact(n - 1)

    def ping(n: int) -> str:
        return "ping" if n == 0 else pong(n - 1)

    def pong(n: int) -> str:
        return "pong" if n == 0 else ping(n - 1)

    def over_local(x: int) -> int:
        return local_fact(x) + offset

    counter = [0]

    def bump(x: int) -> int:
        counter[0] += x
        return counter[0]

    return {
        "lambda": lambda x: x * offset,
        "local_fact": local_fact,
        "ping": ping,
        "over_local": over_local,
        "bump": bump,
        "lambda_default": lambda x, f=lambda y: y + 1: f(x) * 2,
    }


CLOSURES = make_closures()

# (name, function, arguments, ns, expected results). The expected results are written
# out rather than computed, so that running the original cannot set globals (such as
# _late_math) that the payload would then carry.
CASES: list[tuple[str, Callable[..., Any], list[Any], dict[str, Any] | None, list[Any]]] = [
    ("lambda closure", CLOSURES["lambda"], [3, -1], None, [15, -5]),
    ("local recursive", CLOSURES["local_fact"], [5, 1], None, [120, 1]),
    ("local mutual recursion", CLOSURES["ping"], [3, 4], None, ["pong", "ping"]),
    ("closure over local function", CLOSURES["over_local"], [4], None, [29]),
    ("lambda in a default", CLOSURES["lambda_default"], [4], None, [10]),
    ("defaults", with_defaults, [1, (1, 5)], None, [(1, 2, 3), (1, 5, 3)]),
    ("helper and constant", uses_helper, [2], None, [21]),
    ("ns wins", uses_helper, [2], {"SCALE": 100}, [201]),
    ("recursion", fact, [6], None, [720]),
    ("mutual recursion", is_even, [7, 10], None, [False, True]),
    ("global idiom", imports_then_calls, [16.0], None, [4.0]),
    ("Sheepdog 0.2 global idiom", seed_idiom, [25.0], None, [5.0]),
    ("modules and stdlib functions", uses_modules, [4.0], None, ["2.0/b"]),
    ("global in nested code", nested_global, [3], None, [[10, 11, 12]]),
    ("stdlib function as entry", math.sqrt, [9.0], None, [3.0]),
]


def call(f: Callable[..., Any], value: Any) -> Any:
    return f(*value) if isinstance(value, tuple) else f(value)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProcess]:
    process = StubProcess()
    yield process
    process.close()


def run_in_stub(stub: StubProcess, payload: bytes, arguments: list[Any]) -> list[Any]:
    replies = stub.call(payload, s.serialise_args(arguments))
    results = []
    for reply in replies:
        assert reply[0] == "ok", reply
        results.append(s.deserialise_value(reply[1]))
    return results


def stream(payload: bytes) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """Decode a payload without running it: header, persistent ids, pieces."""
    header_line = payload.split(b"\n", 2)[1]
    start = payload.index(header_line) + len(header_line) + 1
    pids: list[Any] = []

    class Reader(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            pids.append(pid)
            return pid

    reader = Reader(io.BytesIO(payload[start:]))
    pieces = [reader.load()]
    while pieces[-1] != ("end",):
        pieces.append(reader.load())
    return json.loads(header_line), pids, pieces


# ---------------------------------------------------------------------------
# Round trips: library side and in the worker Python
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bytecode", "source"])
def test_cases_round_trip_in_library(mode: str) -> None:
    for name, f, arguments, ns, expected in CASES:
        g = s.deserialise_function(s.serialise_function(f, ns, mode=mode))
        assert [call(g, a) for a in arguments] == expected, name


@pytest.mark.parametrize("mode", ["bytecode", "source"])
def test_cases_round_trip_in_worker_python(stub: StubProcess, mode: str) -> None:
    for name, f, arguments, ns, expected in CASES:
        payload = s.serialise_function(f, ns, mode=mode)
        assert run_in_stub(stub, payload, arguments) == expected, name


def test_shared_cells_keep_state_across_calls(stub: StubProcess) -> None:
    payload = s.serialise_function(CLOSURES["bump"])
    assert run_in_stub(stub, payload, [1, 2, 3]) == [1, 3, 6]


def test_names_and_docstring_survive() -> None:
    for mode in ("bytecode", "source"):
        g = s.deserialise_function(s.serialise_function(uses_helper, mode=mode))
        assert (g.__name__, g.__qualname__, g.__doc__) == (
            "uses_helper",
            "uses_helper",
            "Doubles via a helper.",
        )
        h = s.deserialise_function(s.serialise_function(with_defaults, mode=mode))
        assert h.__defaults__ == (2,) and h.__kwdefaults__ == {"c": 3}


def test_global_idiom_needs_no_shipped_module() -> None:
    assert "_late_math" not in globals()
    _, _, pieces = stream(s.serialise_function(imports_then_calls))
    assert {piece[2] for piece in pieces if piece[0] == "global"} == {"root_late"}


def test_only_used_globals_are_shipped_and_builtins_are_not() -> None:
    _, _, pieces = stream(s.serialise_function(uses_helper))
    shipped = {piece[2] for piece in pieces if piece[0] == "global"}
    assert shipped == {"helper", "SCALE"}


def test_functions_of_one_module_share_one_globals_dict() -> None:
    g = s.deserialise_function(s.serialise_function(is_even))
    assert g.__globals__ is g.__globals__["is_odd"].__globals__
    assert "__builtins__" in g.__globals__


def test_explicit_ns_is_shipped_whole_as_in_sheepdog_0_2() -> None:
    g = s.deserialise_function(s.serialise_function(uses_helper, {"unused": 7, "SCALE": 1}))
    assert g.__globals__["unused"] == 7 and g(2) == 3


def test_modules_and_installed_functions_go_by_reference() -> None:
    _, pids, pieces = stream(s.serialise_function(uses_modules))
    assert ("module", "math") in pids and ("module", "os") in pids
    assert [pid for pid in pids if pid[0] == "function"] == [pids[0]]  # only uses_modules
    g = s.deserialise_function(s.serialise_function(uses_modules))
    assert g.__globals__["join"] is join and g.__globals__["math"] is math


def test_user_module_functions_go_by_value_and_stdlib_by_reference() -> None:
    assert s._by_value(helper)  # tests/ is not site-packages or the stdlib
    assert s._by_value(CLOSURES["lambda"])
    assert not s._by_value(join)
    assert not s._by_value(json.dumps)


def test_overrides_are_read_at_call_time(
    monkeypatch: pytest.MonkeyPatch, stub: StubProcess
) -> None:
    monkeypatch.setattr(s, "pickle_protocol", 2)
    monkeypatch.setattr(s, "marshal_version", 2)
    payload = s.serialise_function(fact)
    header, pids, _ = stream(payload)
    assert header["pickle_protocol"] == 2 and header["marshal_version"] == 2
    import marshal

    assert pids[0][2]["code"] == marshal.dumps(fact.__code__, 2)
    assert s.serialise_value(1.5)[:2] == b"\x80\x02"
    replies = stub.call(payload, s.serialise_args([5]))
    assert replies[0][1][:2] == b"\x80\x02"  # results come back in the sender's protocol
    assert s.deserialise_value(replies[0][1]) == 120


# ---------------------------------------------------------------------------
# Version checks and source mode
# ---------------------------------------------------------------------------


def tamper(payload: bytes, **changes: Any) -> bytes:
    magic, header_line, rest = payload.split(b"\n", 2)
    header = json.loads(header_line)
    header.update(changes)
    return magic + b"\n" + json.dumps(header).encode() + b"\n" + rest


def test_stub_refuses_bytecode_from_another_python(stub: StubProcess) -> None:
    payload = tamper(s.serialise_function(fact), python="3.6.15", python_minor=[3, 6])
    with pytest.raises(StubError) as caught:
        stub.call(payload, s.serialise_args([3]))
    message = caught.value.message
    assert caught.value.type_name == "PayloadError"
    assert "3.6.15" in message and "3.11" in message
    assert "`shell`" in message and 'mode="source"' in message
    with pytest.raises(SerialisationError, match="3.6.15"):
        s.deserialise_function(payload)


def test_source_mode_ignores_the_python_version(stub: StubProcess) -> None:
    payload = tamper(
        s.serialise_function(CLOSURES["over_local"], mode="source"),
        python="3.6.15",
        python_minor=[3, 6],
    )
    assert run_in_stub(stub, payload, [3]) == [11]


def uses_sheepdog(x: int) -> int:
    return s.pickle_protocol + x


def test_stub_names_a_module_it_cannot_import(stub: StubProcess) -> None:
    with pytest.raises(StubError, match=r"needs module 'sheepdog.serialisation'.*install it"):
        stub.call(s.serialise_function(uses_sheepdog), [])


def test_stub_refuses_what_is_not_a_payload(stub: StubProcess) -> None:
    with pytest.raises(StubError, match="not a sheepdog function payload"):
        stub.call(b"SHEEPDOG-FN/1\nno header end", [])


def test_stub_refuses_a_pickle_protocol_it_cannot_read(stub: StubProcess) -> None:
    payload = tamper(s.serialise_function(fact), pickle_protocol=99)
    with pytest.raises(StubError, match="pickle_protocol = "):
        stub.call(payload, [])


# pyenv's shim for python3.6 exists even where it refuses to run, so look for the binary.
PY36 = os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python3.6")


@pytest.mark.skipif(not os.path.exists(PY36), reason="no Python 3.6 interpreter here")
def test_source_mode_runs_on_python_3_6_and_bytecode_is_refused() -> None:
    stub36 = StubProcess(PY36)
    try:
        payload = s.serialise_function(CLOSURES["over_local"], mode="source")
        assert run_in_stub(stub36, payload, [3, 4]) == [11, 29]
        payload = s.serialise_function(CLOSURES["bump"], mode="source")
        assert run_in_stub(stub36, payload, [1, 2]) == [1, 3]
        with pytest.raises(StubError, match=r"this worker runs cpython 3\.6\.15"):
            stub36.call(s.serialise_function(fact), [])
    finally:
        stub36.close()


def test_source_mode_refuses_functions_without_source() -> None:
    namespace: dict[str, Any] = {}
    exec("def made_by_exec(x):\n    return x\n", namespace)
    with pytest.raises(SerialisationError, match="made_by_exec"):
        s.serialise_function(namespace["made_by_exec"], mode="source")


def test_source_mode_strips_decorators_and_keeps_defaults(stub: StubProcess) -> None:
    payload = s.serialise_function(with_defaults, mode="source")
    assert run_in_stub(stub, payload, [1, (1, 5)]) == [(1, 2, 3), (1, 5, 3)]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(SerialisationError, match="bytecode"):
        s.serialise_function(fact, mode="wheel")


# ---------------------------------------------------------------------------
# Errors at serialise time
# ---------------------------------------------------------------------------


def test_unpicklable_global_is_named() -> None:
    with pytest.raises(SerialisationError, match=r"global 'LOCK' used by 'uses_lock'.*lock"):
        s.serialise_function(uses_lock)


def test_unpicklable_closure_variable_is_named() -> None:
    with socket.socket() as sock:
        f = (lambda conn: lambda x: conn.fileno() + x)(sock)
        with pytest.raises(SerialisationError, match=r"closure variable 'conn'.*socket"):
            s.serialise_function(f)


def test_unpicklable_default_is_named() -> None:
    def f(x: int, numbers: Any = (i for i in range(3))) -> int:
        return x

    with pytest.raises(SerialisationError, match=r"the defaults of .*f.*generator"):
        s.serialise_function(f)


def test_unpicklable_argument_names_its_index() -> None:
    with pytest.raises(SerialisationError, match=r"args\[1\] \(task 2\).*lock"):
        s.serialise_args([1, threading.Lock(), 3])


def test_main_class_in_argument_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = type("Point", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Point", cls, raising=False)
    with pytest.raises(SerialisationError, match=r"args\[0\].*Point.*__main__"):
        s.serialise_args([cls()])


def test_main_class_as_global_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = type("Point", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Point", cls, raising=False)
    f = (lambda Point: lambda x: Point())(cls)
    with pytest.raises(SerialisationError, match=r"closure variable 'Point'.*__main__"):
        s.serialise_function(f)


def test_seed_names_still_work() -> None:
    assert s.deserialise_pickle(s.serialise_pickle({"a": (1, 2)})) == {"a": (1, 2)}
    assert s.serialise_namespace({}) == s.serialise_namespace(None) == b""
    # A non-empty namespace used to vanish here (issue 13): now it says what to call.
    with pytest.raises(SerialisationError, match=r"serialise_function\(f, ns\)"):
        s.serialise_namespace({"a": 1})
    with pytest.raises(SerialisationError):
        s.serialise_namespace(["not", "a", "dict"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@settings(deadline=None)
@given(st.lists(values, min_size=1, max_size=5))
def test_values_round_trip_exactly_through_the_stub(stub: StubProcess, items: list[Any]) -> None:
    sent = s.serialise_args(items)
    returned = stub.echo(sent, s.pickle_protocol)
    assert [canonical(s.deserialise_value(data)) for data in returned] == [
        canonical(item) for item in items
    ]


@settings(deadline=None)
@given(values)
def test_function_results_round_trip_exactly(stub: StubProcess, value: Any) -> None:
    f = (lambda v: lambda _: v)(value)
    (reply,) = stub.call(s.serialise_function(f), s.serialise_args([0]))
    assert canonical(s.deserialise_value(reply[1])) == canonical(value)


@settings(deadline=None)
@given(steps, st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=1, max_size=4))
def test_generated_functions_give_the_same_results(
    stub: StubProcess, spec: list[tuple[str, int, str]], xs: list[int]
) -> None:
    f = build_function(spec)
    expected = [f(x) for x in xs]
    for mode in ("bytecode", "source"):
        payload = s.serialise_function(f, mode=mode)
        assert [s.deserialise_function(payload)(x) for x in xs] == expected
        assert run_in_stub(stub, payload, xs) == expected
