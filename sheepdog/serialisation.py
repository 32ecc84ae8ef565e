"""Turn functions and values into bytes for the workers, and back.

Workers have only the standard library, so a function travels *by value*: its code
object goes through :mod:`marshal` (or, in source mode, its source text) together with
everything it needs to run, and the worker stub rebuilds it with
:class:`types.FunctionType`. Argument values and results are ordinary pickles.

What a function payload carries
-------------------------------

Starting from the function, everything it reaches is collected automatically, as
cloudpickle does:

* its closure cells, defaults, keyword-only defaults and ``__dict__``;
* the globals its code reads or writes (``LOAD_GLOBAL``/``STORE_GLOBAL``/``DELETE_GLOBAL``
  of its code and of the code objects nested in it), recursively through every function
  shipped by value. Builtins are not shipped. An explicit ``ns`` dict (Sheepdog 0.2's
  namespace) is shipped whole and takes precedence over the function's own globals.

Functions defined in the same module share **one** globals dict on the worker, as they
do in Python, so recursion, mutual recursion and Sheepdog 0.2's idiom ``import numpy as
np; global np`` in one function, used by another, all work. Functions shipped from a
different module get that module's own globals dict, so equal names cannot clash.

By value or by reference
------------------------

The workers do not have the user's own code installed, only the standard library and
whatever is installed on the cluster. The rule:

* A **module** always goes by reference (its name) and is imported on the worker.
* A **function** goes by reference (module and qualified name) when its module file lies
  in the standard library or a site-packages directory (or is built in) and the name
  leads back to the same object; otherwise by value: functions defined in ``__main__``,
  in a notebook, in a local scope, lambdas, and functions from the user's own files
  (a project package or script next to the main script).
* A **class** goes by reference. Classes defined in ``__main__`` or in a local scope
  cannot be imported by the worker and are refused with :class:`SerialisationError`;
  move them into a module that is installed on the workers. Classes from the user's own
  files outside site-packages go by reference too (the worker needs them importable,
  e.g. through a shared file system and ``PYTHONPATH``); a warning is logged.
* Everything else is pickled; a value that cannot be pickled raises
  :class:`SerialisationError` here, naming the global, closure variable, default or
  argument it came from.

Python versions
---------------

Marshalled bytecode only loads on the same Python minor version. The payload records
the sender's version, and the stub refuses a mismatch with an error naming both
versions. Two ways out: point ``shell`` at a matching Python on the workers, or use
``mode="source"``, which ships each by-value function's source text
(:func:`inspect.getsource`, with decorators, defaults and annotations stripped and
re-applied from the live values). Source mode needs source: functions typed at the
interactive prompt, made by ``exec`` or lambdas that cannot be told apart on their line
raise :class:`SerialisationError`. Closures are supported in source mode by compiling
the function inside a factory that declares its free variables; each function gets its
own cells holding the same values, so two functions that rebind a shared ``nonlocal``
no longer see each other's writes (bytecode mode keeps shared cells shared).

Payload format (version 1)
--------------------------

``b"SHEEPDOG-FN/1\\n"``, then a one-line JSON header ending in ``\\n``::

    {"mode": "bytecode" | "source", "implementation": "cpython",
     "python": "3.11.7", "python_minor": [3, 11],
     "pickle_protocol": 4, "marshal_version": 4}

then a stream of pickles (``pickle_protocol``) read by one unpickler, so that objects
keep their identity across the stream. Each pickle is one tuple:

* ``("entry", f)``, first; ``("end",)``, last;
* ``("lines", filename, text)``: the source file of by-value functions, put into
  ``linecache`` on the worker so that remote tracebacks show the lines;
* ``("global", ns_index, name, value)``: a global of the namespace ``ns_index``;
* ``("cell", cell_index, value)``: the contents of a closure cell;
* ``("set", function, attribute, value)``: ``__defaults__``, ``__kwdefaults__`` or
  ``__dict__``.

Modules and by-value functions inside these values are pickle *persistent ids*:
``("module", name)``, and ``("function", index, spec)`` the first time a function
appears, ``("function", index)`` afterwards. ``spec`` is a dict with ``name``,
``qualname``, ``module``, ``doc``, ``namespace`` (``[ns_index, module_name]``) and
either ``code`` (marshalled code) with ``closure`` (cell indices in ``co_freevars``
order), or ``source`` (text defining ``__sheepdog_factory__``), ``filename`` and
``closure`` (``[[free_var_name, cell_index], ...]``).

The module-level ``pickle_protocol`` and ``marshal_version`` can be overridden (as in
Sheepdog 0.2); they are read each time something is serialised.
"""

from __future__ import annotations

import ast
import base64
import binascii
import copy
import dis
import functools
import inspect
import io
import json
import logging
import marshal
import os
import pickle
import platform
import site
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable, Iterable
from typing import IO, Any

from sheepdog.errors import SerialisationError
from sheepdog.stubfile import load_stub

__all__ = [
    "deserialise_arg",
    "deserialise_args",
    "deserialise_file",
    "deserialise_function",
    "deserialise_namespace",
    "deserialise_pickle",
    "deserialise_value",
    "marshal_version",
    "pickle_protocol",
    "serialise_arg",
    "serialise_args",
    "serialise_function",
    "serialise_namespace",
    "serialise_pickle",
    "serialise_value",
]

logger = logging.getLogger(__name__)

#: Pickle protocol for arguments, results and the function payload (Sheepdog 0.2 name).
pickle_protocol: int = pickle.DEFAULT_PROTOCOL
#: Marshal format version for bytecode (Sheepdog 0.2 name).
marshal_version: int = marshal.version

PAYLOAD_MAGIC = b"SHEEPDOG-FN/1\n"
MODES = ("bytecode", "source")
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME"})
_FUNCTION_ATTRS = ("__defaults__", "__kwdefaults__", "__dict__")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def serialise_function(
    f: Callable[..., Any], ns: dict[str, Any] | None = None, *, mode: str = "bytecode"
) -> bytes:
    """Return the payload that lets a worker rebuild ``f`` with everything it uses.

    ``ns`` (optional) is shipped whole into ``f``'s globals and wins over ``f``'s own
    globals of the same name. ``mode`` is ``"bytecode"`` (same Python minor version on
    the workers) or ``"source"`` (any Python 3.6+, for functions that have source).
    Raises :class:`SerialisationError` naming what could not be serialised.
    """
    if mode not in MODES:
        raise SerialisationError(f"unknown serialisation mode {mode!r}; use one of {MODES}")
    if not callable(f):
        raise SerialisationError(f"cannot serialise {f!r}: it is not callable")
    header = {
        "mode": mode,
        "implementation": sys.implementation.name,
        "python": platform.python_version(),
        "python_minor": list(sys.version_info[:2]),
        "pickle_protocol": pickle_protocol,
        "marshal_version": marshal_version,
    }
    buffer = io.BytesIO()
    buffer.write(PAYLOAD_MAGIC)
    buffer.write(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")
    _FunctionWriter(buffer, mode, ns or {}).write(f)
    payload = buffer.getvalue()
    logger.debug("serialised %s (%s mode): %d bytes", _describe(f), mode, len(payload))
    return payload


def deserialise_function(
    payload: bytes, namespace: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """Rebuild a function from :func:`serialise_function`'s payload, as the stub does.

    ``namespace`` (Sheepdog 0.2's second argument) is added to the function's
    globals, winning over names of the same name, as ``ns`` does when serialising.
    """
    stub = _stub_namespace()
    payload_error: type[Exception] = stub["PayloadError"]
    try:
        function: Callable[..., Any] = stub["load_function"](payload)
    except payload_error as exc:
        raise SerialisationError(str(exc)) from exc
    if namespace:
        if not isinstance(namespace, dict):
            raise SerialisationError(
                f"a namespace must be a dict, not {type(namespace).__name__}"
            )
        globals_dict = getattr(function, "__globals__", None)
        if globals_dict is None:
            raise SerialisationError(
                f"{_describe(function)} has no globals to put the namespace in"
            )
        globals_dict.update(namespace)
    return function


#: Values whose pickle names no class or function but their own builtin type.
_PLAIN_TYPES = frozenset({bytes, bytearray, str, int, float, complex, bool, type(None)})


def serialise_value(obj: object, *, what: str = "value") -> bytes:
    """Pickle one argument or result value; ``what`` names it in error messages."""
    protocol = pickle_protocol
    try:
        data = pickle.dumps(obj, protocol)
    except Exception as exc:
        message = f"cannot serialise {what} {_short_repr(obj)}: {_why(exc)}"
        raise SerialisationError(message) from exc
    if type(obj) not in _PLAIN_TYPES and b"__main__" in data:
        # Cheap test first: only a pickle that mentions __main__ can refer to a class or
        # function the worker (whose __main__ is the job file) cannot import. Even so it
        # reads the whole pickle (0.2 s for 400 MB): skipped where no class can be in it.
        try:
            _ValueChecker(io.BytesIO(), protocol).dump(obj)
        except SerialisationError as exc:
            raise SerialisationError(f"cannot serialise {what} {_short_repr(obj)}: {exc}") from exc
    return data


def deserialise_value(data: bytes) -> object:
    """Unpickle an argument or result value."""
    return pickle.loads(data)  # noqa: S301 - values this user's own tasks pickled


def deserialise_file(f: IO[bytes]) -> object:
    """Unpickle an argument or result value from a binary file (a large value's blob)."""
    return pickle.load(f)  # noqa: S301 - values this user's own tasks pickled


def deserialise_args(blobs: Iterable[bytes]) -> list[object]:
    """Unpickle each of :func:`serialise_args`' blobs (Sheepdog 0.2 name)."""
    return [deserialise_pickle(blob) for blob in blobs]


def serialise_args(args: Iterable[object]) -> list[bytes]:
    """Pickle each argument value; an error names the argument's index and task number."""
    return [
        serialise_value(value, what=f"args[{index}] (task {index + 1})")
        for index, value in enumerate(args)
    ]


def serialise_pickle(obj: object) -> bytes:
    """Sheepdog 0.2 name of :func:`serialise_value` (a plain pickle now, not base64)."""
    return serialise_value(obj)


def deserialise_pickle(data: bytes | str) -> object:
    """Sheepdog 0.2 name of :func:`deserialise_value`; also reads 0.2's base64 blobs.

    Every pickle ends with the STOP opcode ``.``, which is not a base64 character, so
    the two cannot be confused.
    """
    raw = data.encode("ascii") if isinstance(data, str) else bytes(data)
    if raw.endswith(b"."):
        return deserialise_value(raw)
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SerialisationError(
            f"{_short_repr(raw)} is neither a pickle nor Sheepdog 0.2's base64 of one"
        ) from exc
    return deserialise_value(decoded)


#: Sheepdog 0.2 names of one argument's (de)serialisation.
serialise_arg = serialise_pickle
deserialise_arg = deserialise_pickle


def serialise_namespace(ns: dict[str, Any] | None) -> bytes:
    """Return ``b""`` for an empty namespace; refuse a non-empty one, saying what to call.

    Sheepdog 0.2's low-level path was ``Storage.new_request(serialise_function(f),
    serialise_namespace(ns), args)``. The namespace now travels inside the function
    payload, so a separate one would be lost and the workers would fail with
    ``NameError``: pass it as ``serialise_function(f, ns)`` and ``b""`` here.
    """
    if ns is not None and not isinstance(ns, dict):
        raise SerialisationError(f"a namespace must be a dict, not {type(ns).__name__}")
    if ns:
        raise SerialisationError(
            f"serialise_namespace cannot carry the names {sorted(ns)}: the namespace now "
            "travels inside the function payload. Call serialise_function(f, ns) and pass "
            'b"" as the namespace to Storage.new_request'
        )
    return b""


def deserialise_namespace(data: bytes) -> dict[str, Any]:
    """Refuse: Sheepdog 0.2's separate namespace no longer exists (see :func:`serialise_namespace`).

    Returns ``{}`` for the empty namespace ``b""`` that sheepdog stores.
    """
    if not data:
        return {}
    raise SerialisationError(
        "deserialise_namespace is gone: the namespace travels inside the function payload "
        "now; deserialise_function(payload) returns the function with its globals"
    )


# ---------------------------------------------------------------------------
# By value or by reference
# ---------------------------------------------------------------------------


@functools.cache
def _installed_prefixes() -> tuple[str, ...]:
    paths: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            paths.add(path)
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except AttributeError:  # an old virtualenv's site.py lacks these
        pass
    return tuple(sorted({os.path.realpath(p) + os.sep for p in paths}))


@functools.lru_cache(maxsize=1024)
def _module_is_installed(name: str) -> bool:
    """Whether the module comes with Python or from site-packages (so workers may have it)."""
    if name == "__main__":
        return False
    module = sys.modules.get(name)
    if module is None:
        return False
    filename = getattr(module, "__file__", None)
    if filename is None:
        return name in sys.builtin_module_names or getattr(module, "__spec__", None) is not None
    return bool(os.path.realpath(filename).startswith(_installed_prefixes()))


def _lookup(module_name: str, qualname: str) -> object:
    obj: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _by_value(f: types.FunctionType) -> bool:
    module = getattr(f, "__module__", None)
    if not module or "<locals>" in f.__qualname__ or f.__name__ == "<lambda>":
        return True
    if not _module_is_installed(module):
        return True
    return _lookup(module, f.__qualname__) is not f


def _check_class(cls: type) -> None:
    module = getattr(cls, "__module__", None) or "?"
    if module == "__main__" or "<locals>" in cls.__qualname__:
        where = "in __main__" if module == "__main__" else "in a local scope"
        raise SerialisationError(
            f"class {cls.__qualname__} is defined {where}, which the workers cannot import; "
            "move it into a module that is installed on the workers"
        )
    if not _module_is_installed(module) and module not in _warned_modules:
        _warned_modules.add(module)
        logger.warning(
            "class %s.%s goes by reference: module %s must be importable on the workers",
            module,
            cls.__qualname__,
            module,
        )


_warned_modules: set[str] = set()


class _ValueChecker(pickle.Pickler):
    """Pickler that refuses classes and functions the worker cannot import."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, type):
            _check_class(obj)
        elif isinstance(obj, types.FunctionType) and obj.__module__ == "__main__":
            raise SerialisationError(
                f"function {obj.__qualname__} is defined in __main__, which the workers "
                "cannot import; a function can only travel as the mapped function or "
                "through its globals, not inside an argument"
            )
        return None


# ---------------------------------------------------------------------------
# The function payload
# ---------------------------------------------------------------------------


def _code_global_names(code: types.CodeType) -> list[str]:
    names: dict[str, None] = {}
    for instruction in dis.get_instructions(code):
        if instruction.opname in _GLOBAL_OPS:
            names[str(instruction.argval)] = None
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(_code_global_names(const)))
    return list(names)


#: Source files larger than this are not shipped for tracebacks.
MAX_SOURCE_BYTES = 1 << 20


def _source_texts(filenames: list[str]) -> list[tuple[str, str]]:
    """The text of each readable source file, so remote tracebacks can show the lines."""
    texts = []
    for filename in filenames:
        try:
            if os.path.getsize(filename) > MAX_SOURCE_BYTES:
                continue
            with open(filename, encoding="utf-8") as fh:
                texts.append((filename, fh.read()))
        except (OSError, UnicodeDecodeError):
            continue  # <stdin>, a notebook cell, a deleted file: tracebacks show no line
    return texts


class _FunctionWriter(pickle.Pickler):
    """Writes the pickle stream of a function payload (see the module docstring)."""

    def __init__(self, file: io.BytesIO, mode: str, ns: dict[str, Any]) -> None:
        super().__init__(file, pickle_protocol)
        self.mode = mode
        self.ns = ns
        self.functions: dict[int, int] = {}  # id(function) -> index
        self.namespaces: dict[int, int] = {}  # id(globals dict) -> index
        self.cells: dict[object, int] = {}  # id(cell), or (id(cell), id(function))
        self.keep: list[object] = []  # keeps ids above valid
        self.queue: list[types.FunctionType] = []
        self.shipped_globals: set[tuple[int, str]] = set()
        self.ns_index: int | None = None  # the namespace that ``ns`` belongs to
        self.filenames: list[str] = []  # source files of by-value functions, for tracebacks

    def write(self, f: Callable[..., Any]) -> None:
        self._dump(("entry", f), f"function {_describe(f)}")
        if isinstance(f, types.FunctionType) and id(f) in self.functions:
            self.ns_index = self._namespace(f.__globals__)
            for name, value in self.ns.items():
                self.shipped_globals.add((self.ns_index, name))
                self._dump(("global", self.ns_index, name, value), f"ns[{name!r}]")
        elif self.ns:
            logger.warning("ns ignored: %s goes by reference, not by value", _describe(f))
        while self.queue:
            self._write_state(self.queue.pop(0))
        for filename, text in _source_texts(self.filenames):
            self._dump(("lines", filename, text), f"the source of {filename}")
        self._dump(("end",), "end")

    def _dump(self, piece: tuple[Any, ...], what: str) -> None:
        try:
            self.dump(piece)
        except SerialisationError as exc:
            raise SerialisationError(f"cannot serialise {what}: {exc}") from exc
        except Exception as exc:
            raise SerialisationError(f"cannot serialise {what}: {_why(exc)}") from exc

    def _write_state(self, f: types.FunctionType) -> None:
        name = _describe(f)
        if f.__code__.co_filename not in self.filenames:
            self.filenames.append(f.__code__.co_filename)
        ns_index = self._namespace(f.__globals__)
        use_ns = ns_index == self.ns_index
        for global_name in _code_global_names(f.__code__):
            if (ns_index, global_name) in self.shipped_globals:
                continue
            if use_ns and global_name in self.ns:
                value = self.ns[global_name]
            elif global_name in f.__globals__:
                value = f.__globals__[global_name]
            else:
                continue  # a builtin, or a name the function sets itself at run time
            self.shipped_globals.add((ns_index, global_name))
            self._dump(
                ("global", ns_index, global_name, value),
                f"global {global_name!r} used by {name}",
            )
        for var, cell in zip(f.__code__.co_freevars, f.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:
                continue  # an empty cell: the variable is not assigned yet
            self._dump(
                ("cell", self._cell(cell, f), contents),
                f"closure variable {var!r} of {name}",
            )
        if f.__defaults__:
            self._dump(("set", f, "__defaults__", f.__defaults__), f"the defaults of {name}")
        if f.__kwdefaults__:
            self._dump(
                ("set", f, "__kwdefaults__", f.__kwdefaults__),
                f"the keyword-only defaults of {name}",
            )
        if f.__dict__:
            self._dump(("set", f, "__dict__", f.__dict__), f"the attributes of {name}")

    def _namespace(self, globals_dict: dict[str, Any]) -> int:
        key = id(globals_dict)
        if key not in self.namespaces:
            self.namespaces[key] = len(self.namespaces)
            self.keep.append(globals_dict)
        return self.namespaces[key]

    def _cell(self, cell: types.CellType, f: types.FunctionType) -> int:
        # In source mode each rebuilt function brings its own cells, so cells are per function.
        key: object = (id(cell), id(f)) if self.mode == "source" else id(cell)
        if key not in self.cells:
            self.cells[key] = len(self.cells)
            self.keep.append(cell)
        return self.cells[key]

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            return ("module", obj.__name__)
        if isinstance(obj, type):
            _check_class(obj)
            return None
        if not isinstance(obj, types.FunctionType) or not _by_value(obj):
            return None
        index = self.functions.get(id(obj))
        if index is not None:
            return ("function", index)
        index = self.functions[id(obj)] = len(self.functions)
        self.keep.append(obj)
        self.queue.append(obj)
        return ("function", index, self._spec(obj))

    def _spec(self, f: types.FunctionType) -> dict[str, Any]:
        module = f.__globals__.get("__name__", f.__module__)
        spec: dict[str, Any] = {
            "name": f.__name__,
            "qualname": f.__qualname__,
            "module": f.__module__,
            "doc": f.__doc__,
            "namespace": [self._namespace(f.__globals__), module],
        }
        cells = f.__closure__ or ()
        if self.mode == "bytecode":
            spec["code"] = marshal.dumps(f.__code__, marshal_version)
            spec["closure"] = [self._cell(cell, f) for cell in cells]
        else:
            spec["source"] = _factory_source(f)
            spec["filename"] = f"<sheepdog source of {f.__qualname__}>"
            spec["closure"] = [
                [var, self._cell(cell, f)] for var, cell in zip(f.__code__.co_freevars, cells)
            ]
        return spec


# ---------------------------------------------------------------------------
# Source mode
# ---------------------------------------------------------------------------


def _strip(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
    """Drop what Python evaluates at definition time; the live values are shipped instead."""
    arguments = node.args
    arguments.defaults = []
    arguments.kw_defaults = [None] * len(arguments.kwonlyargs)
    if not isinstance(node, ast.Lambda):
        node.decorator_list = []
        node.returns = None
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
        for argument in every:
            argument.annotation = None


def _factory(free_vars: Iterable[str], body: str, result: str) -> str:
    lines = ["def __sheepdog_factory__():"]
    free = list(free_vars)
    if free:
        # Assigned nowhere but declared local, so the function closes over empty cells
        # that the stub fills with the shipped values.
        lines += ["    if False:", "        " + " = ".join(free) + " = None"]
    lines.append(textwrap.indent(body, "    "))
    lines.append(f"    return {result}")
    return "\n".join(lines) + "\n"


def _no_source(name: str, exc: BaseException) -> SerialisationError:
    return SerialisationError(
        f"source mode needs the source of {name}, but there is none ({exc}); "
        "define it in a file, or use mode='bytecode' with a matching Python on the workers"
    )


def _factory_source(f: types.FunctionType) -> str:
    """Return source text defining ``__sheepdog_factory__()``, which returns a copy of f."""
    name = _describe(f)
    where = f"{f.__code__.co_filename}:{f.__code__.co_firstlineno}"
    free = f.__code__.co_freevars
    if f.__name__ == "<lambda>":
        return _lambda_factory_source(f, name, where)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
    except (OSError, TypeError) as exc:
        raise _no_source(name, exc) from exc
    except SyntaxError as exc:
        raise SerialisationError(
            f"source mode cannot parse the source of {name} ({where}): {exc.msg}"
        ) from exc
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
        node.name != f.__code__.co_name
    ):
        raise SerialisationError(f"source mode found no definition of {name} at {where}")
    _strip(node)
    return _factory(free, ast.unparse(node), node.name)


def _lambda_factory_source(f: types.FunctionType, name: str, where: str) -> str:
    try:
        # A lambda's own lines often do not parse (a lambda inside a call or a dict
        # display), so look for it in the whole file, on its first line.
        lines, _ = inspect.findsource(f)
    except (OSError, TypeError) as exc:
        raise _no_source(name, exc) from exc
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError as exc:
        raise SerialisationError(
            f"source mode cannot parse the file of {name} ({where}): {exc.msg}"
        ) from exc
    lambdas = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
    for candidate in lambdas:
        if candidate.lineno == f.__code__.co_firstlineno:
            candidate = copy.deepcopy(candidate)  # stripping may drop other lambdas
            _strip(candidate)
            body = f"__sheepdog_lambda__ = ({ast.unparse(candidate)})"
            text = _factory(f.__code__.co_freevars, body, "__sheepdog_lambda__")
            if _same_code(text, f.__code__):
                return text
    raise SerialisationError(
        f"source mode cannot tell which lambda at {where} is {name}; "
        "define it with def, or use mode='bytecode'"
    )


def _same_code(factory_source: str, code: types.CodeType) -> bool:
    """Whether the factory's function matches ``code`` (co_code varies too much to compare)."""
    namespace: dict[str, Any] = {}
    exec(compile(factory_source, "<sheepdog check>", "exec", dont_inherit=True), {}, namespace)  # noqa: S102 - sheepdog's own factory source
    rebuilt = namespace["__sheepdog_factory__"]().__code__

    def shape(c: types.CodeType) -> tuple[object, ...]:
        consts = tuple(k for k in c.co_consts if not isinstance(k, types.CodeType))
        # The factory nests every function, and __future__ flags (above 0xFFFF) only
        # concern annotations, which are stripped.
        flags = c.co_flags & 0xFFFF & ~inspect.CO_NESTED
        counts = (c.co_argcount, c.co_posonlyargcount, c.co_kwonlyargcount, flags)
        return (counts, c.co_names, c.co_varnames, c.co_freevars, c.co_cellvars, consts)

    return shape(rebuilt) == shape(code)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _describe(f: object) -> str:
    qualname = getattr(f, "__qualname__", None) or repr(f)
    module = getattr(f, "__module__", None)
    return f"{qualname!r} (module {module})" if module else repr(qualname)


def _short_repr(obj: object) -> str:
    text = repr(obj) if not isinstance(obj, type) else obj.__qualname__
    return text if len(text) <= 80 else text[:77] + "..."


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _stub_namespace() -> dict[str, Any]:
    """The worker stub's names: the library decodes with the workers' own code."""
    try:
        return vars(load_stub())
    except FileNotFoundError as exc:
        raise SerialisationError(str(exc)) from exc
