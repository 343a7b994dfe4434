"""The handler check of an upload: ``module:function`` well formed, the module in the archive, the function bound in it.

Static: the module is parsed, never imported or run (the gateway holds no function code).
"""

from __future__ import annotations

import ast
import keyword
from typing import Any

from shared.archive import Archive
from shared.errors import InvalidRequest


def parse_handler(value: Any, where: str) -> str:
    def ok(name: str) -> bool:
        return name.isidentifier() and not keyword.iskeyword(name)

    module, sep, func = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not ok(func) or not all(ok(part) for part in module.split(".")):
        raise InvalidRequest(f"{where} {value!r:.80} is not a handler; use 'module:function', e.g. 'main:handler'")
    return value


def _top_level(body: list[ast.stmt]) -> Any:
    """Statements that run at import: the body and any if/try/with/for blocks, not def/class bodies."""
    for stmt in body:
        yield stmt
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for attr in ("body", "orelse", "finalbody", "handlers"):
                yield from _top_level(getattr(stmt, attr, []))


def _bound_names(body: list[ast.stmt]) -> tuple[set[str], bool]:
    """Names a module binds at top level, and whether it does `from x import *`."""
    names: set[str] = set()
    star = False
    for stmt in _top_level(body):
        targets: list[ast.AST] = []
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            star = star or any(alias.name == "*" for alias in stmt.names)
            names.update(alias.asname or alias.name.split(".")[0] for alias in stmt.names)
        elif isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets = [stmt.target]
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            targets = [stmt.target]
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            targets = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
        names.update(node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name))
    return names, star


def check_handler(archive: Archive, handler: str) -> None:
    """Statically check that handler's module is in the archive and binds the function (no code runs)."""
    parse_handler(handler, "handler")  # a malformed handler must not become a file path
    module, _, func = handler.partition(":")
    base = module.replace(".", "/")
    path = next((p for p in (f"{base}.py", f"{base}/__init__.py") if archive.get(p) is not None), None)
    if path is None:
        raise InvalidRequest(f"handler module {module!r} not found: no {base}.py in the archive; "
                             "add it or fix spec.handler")
    try:
        tree = ast.parse(archive.files[path], filename=path)
    except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes, on some Python versions
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        reason = getattr(exc, "msg", None) or str(exc)
        raise InvalidRequest(f"{path}{line}: invalid syntax ({reason}); fix it and deploy again") from None
    names, star = _bound_names(tree.body)
    if func not in names and not star:
        raise InvalidRequest(f"handler {handler!r} not found in {path}: define `def {func}(context, event)` "
                             "at the top level of the module or fix spec.handler")
