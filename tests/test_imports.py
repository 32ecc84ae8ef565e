"""The package's import graph: no cycle between sheepdog's modules, and none imports the root.

Imports inside functions count too (a lazy import only hides a cycle); imports
under ``if TYPE_CHECKING:`` do not, as they never run. Arrows that must run one
way (the config knows no scheduler) are checked here too, and that importing the
config asks the system nothing.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sheepdog"


def module_name(path: Path) -> str:
    parts = ["sheepdog", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "_stub" not in p.parts}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The sheepdog modules that ``name`` imports (the root itself as ``sheepdog``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sheepdog")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "sheepdog":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules its imports run, with the packages whose __init__ they run."""
    known = modules()
    edges = {}
    for name, path in known.items():
        deps = imports_of(name, path, set(known))
        for dep in list(deps):
            parts = dep.split(".")
            # Importing sheepdog.a.b runs sheepdog/a/__init__.py first (not the root:
            # that is reported on its own).
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)))
        deps.discard(name)
        # A module's own package is already being imported when it runs.
        edges[name] = {d for d in deps if d == "sheepdog" or not name.startswith(d + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def path_to(edges: dict[str, set[str]], start: str, package: str) -> list[str] | None:
    """The imports by which ``start`` runs ``package`` or a module in it, or None.

    The root is not followed: every module runs it first, and it imports everything.
    """
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(edges.get(node, set()) - {"sheepdog"} - set(paths)):
            paths[nxt] = [*paths[node], nxt]
            if nxt == package or nxt.startswith(package + "."):
                return paths[nxt]
            todo.append(nxt)
    return None


#: Modules that still import the package root, each with why it is not fixed here.
KNOWN_ROOT_IMPORTS: set[str] = set()


def test_no_module_imports_the_package_root() -> None:
    offenders = sorted(name for name, deps in graph().items()
                       if name != "sheepdog" and "sheepdog" in deps)
    assert sorted(set(offenders) - KNOWN_ROOT_IMPORTS) == [], (
        f"these modules import the package root: {offenders}")
    assert KNOWN_ROOT_IMPORTS <= set(offenders), "a known exception was fixed: drop it"


def test_there_is_no_import_cycle() -> None:
    edges = {name: deps - {"sheepdog"} for name, deps in graph().items()}
    # The package's __init__ re-exports the modules; a module's own package
    # __init__ is a parent, not a dependency that could close a cycle back to it.
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_config_imports_no_scheduler() -> None:
    """The schedulers read their keys from the config (and check their raw options); the
    config names no scheduler, so the arrow runs one way."""
    path = path_to(graph(), "sheepdog.config", "sheepdog.scheduler")
    assert path is None, "sheepdog.config imports a scheduler: " + " -> ".join(path or [])


def test_the_arrow_finder_finds_an_arrow() -> None:
    edges = {"sheepdog.config": {"sheepdog", "sheepdog.errors", "sheepdog.directives"},
             "sheepdog.directives": {"sheepdog.scheduler.base", "sheepdog.scheduler"},
             "sheepdog.errors": set()}
    assert path_to(edges, "sheepdog.config", "sheepdog.scheduler") == [
        "sheepdog.config", "sheepdog.directives", "sheepdog.scheduler"]
    edges["sheepdog.directives"] = {"sheepdog"}
    assert path_to(edges, "sheepdog.config", "sheepdog.scheduler") is None


def test_importing_the_config_asks_the_system_nothing() -> None:
    """No login name, no FQDN (which may ask DNS) at import: default_config asks when read."""
    code = textwrap.dedent("""
        import getpass, socket
        asked = []
        getpass.getuser = lambda: asked.append("getuser") or "me"
        socket.getfqdn = lambda name="": asked.append("getfqdn") or "here.example"
        import sheepdog.config
        import sheepdog
        print(asked)
        defaults = sheepdog.default_config
        assert defaults is sheepdog.config.default_config is sheepdog.default_config
        print(asked, defaults["ssh_user"], defaults["localhost"])
    """)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "['getuser', 'getfqdn'] me here.example"]


def test_the_package_root_only_re_exports_with_one_sorted_all() -> None:
    """``sheepdog/__init__.py`` defines nothing of its own; ``__all__`` is sorted and complete."""
    import sheepdog

    root = PACKAGE / "__init__.py"
    tree = ast.parse(root.read_text())
    own = [
        node for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.FunctionDef, ast.ClassDef))
        and not (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets]
                 == ["__all__"])
    ]
    assert not own, f"{root} defines {[ast.unparse(node)[:60] for node in own]}"
    assert sheepdog.__all__ == sorted(sheepdog.__all__)
    public = {
        name for name, value in vars(sheepdog).items()
        if not name.startswith("_") and getattr(value, "__module__", "sheepdog") != "sheepdog"
        and not isinstance(value, type(sheepdog))
    }
    missing = public - set(sheepdog.__all__) - {"annotations", "logging"}
    assert not missing, f"public names not in sheepdog.__all__: {sorted(missing)}"
    assert all(hasattr(sheepdog, name) for name in sheepdog.__all__)
