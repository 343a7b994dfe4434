"""The import graph of services/ and shared/: no circles, no one else's private names, services meet only in shared/.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``. Importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so it is an edge to each of them,
except to the importer's own packages (they are initialised before any module inside them runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("services", "shared")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module below services/ and shared/."""
    modules: dict[str, Path] = {}
    for top in TOP:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module a dotted name lives in (a module, or a name inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _with_packages(name: str, modules: dict[str, Path]) -> set[str]:
    """A module and the packages whose ``__init__`` importing it runs."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def imports_of(name: str, modules: dict[str, Path]) -> tuple[set[str], list[tuple[str, str]]]:
    """The project modules ``name`` imports, and the (module, private name) pairs it takes from others."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: set[str] = set()
    private: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _owner(alias.name, modules):
                    edges |= _with_packages(_owner(alias.name, modules) or "", modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            source = _owner(base, modules)
            if source is None:
                continue
            edges |= _with_packages(source, modules)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    edges |= _with_packages(full, modules)
                elif alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((source, alias.name))
    parts = name.split(".")
    edges -= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # itself and its own packages
    return edges, private


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    modules = project_modules(root)
    edges: dict[str, set[str]] = {}
    private: dict[str, list[tuple[str, str]]] = {}
    for name in modules:
        edges[name], taken = imports_of(name, modules)
        if taken:
            private[name] = taken
    return edges, private


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _service(name: str) -> str | None:
    """``services.<folder>`` for a module below it (folders are processes); None for shared/ and the root."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else None


def crossings(edges: dict[str, set[str]]) -> list[str]:
    """Imports from one service's folder into another's, or from shared/ into any service."""
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if _service(target) is None:
                continue
            if source.startswith("shared") or (_service(source) and _service(source) != _service(target)):
                bad.append(f"{source} imports {target}")
    return bad


def test_no_import_circles() -> None:
    edges, _ = graph()
    assert circles(edges) == [], "modules that import each other (directly or round a circle): break the circle" \
        " with a module both can import, or pass the collaborator in"


def test_no_module_imports_another_modules_private_names() -> None:
    _, private = graph()
    assert private == {}, "give the shared thing a public name in the module that owns it"


def test_services_meet_only_in_shared() -> None:
    edges, _ = graph()
    assert crossings(edges) == [], "a service's folder is one process: what two of them share goes in shared/"


def test_the_checks_see_what_they_check(tmp_path: Path) -> None:
    """Each check finds what it is for in a small tree: a circle through a function-level and a
    TYPE_CHECKING import, a private name, and a service importing another's module."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "a.py").write_text("def f():\n    from shared.b import g\n")
    (tmp_path / "shared" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from shared.a import f\n_x = 1\n")
    (tmp_path / "services" / "one").mkdir(parents=True)
    (tmp_path / "services" / "two").mkdir()
    for init in ("services", "services/one", "services/two"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "services" / "one" / "m.py").write_text("from services.two.n import y\nfrom shared.b import _x\n")
    (tmp_path / "services" / "two" / "n.py").write_text("y = 1\n")
    edges, private = graph(tmp_path)
    assert circles(edges) == [["shared.a", "shared.b"]]
    assert private == {"services.one.m": [("shared.b", "_x")]}
    assert crossings(edges) == ["services.one.m imports services.two", "services.one.m imports services.two.n"]
