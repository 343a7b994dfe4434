"""The deploy file of `nuclide deploy -f FILE`: several functions in one YAML file, in the spirit of faas-cli's stack.yml.

    version: 1.0                  # optional
    functions:
      hello:                      # the function's name
        handler: ./hello          # its folder, .zip or .py file, relative to this file
      resize:
        handler: ./resize.zip

faas-cli's other keys (``provider``, and ``lang``, ``image``, ``environment``... under a function)
are ignored with a warning, so an OpenFaaS stack file whose handlers are nuclide functions deploys
as it is. The whole file is checked before anything is deployed: a wrong file changes nothing, and
its error names the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.errors import InvalidRequest
from shared.names import validate_function_name
from services.cli.client import CliError

KNOWN_TOP = frozenset({"version", "functions"})
IGNORED_TOP = frozenset({"provider", "configuration"})  # faas-cli's
KNOWN_FUNCTION = frozenset({"handler"})


@dataclass(frozen=True)
class Entry:
    name: str
    handler: Path
    line: int


def _where(path: Path, node: yaml.Node) -> str:
    return f"{path} line {node.start_mark.line + 1}"


def _scalar(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" else None


def read(path: Path) -> tuple[list[Entry], list[str]]:
    """The functions the file lists, in its order, and warnings; a CliError naming the line and field if wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read the deploy file {path}: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        raise CliError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(root, yaml.MappingNode):
        raise CliError(f"{path}: a deploy file is a mapping with a 'functions' key, like\n"
                       "functions:\n  hello:\n    handler: ./hello")
    warnings: list[str] = []
    functions: yaml.Node | None = None
    for key, value in root.value:
        name = _scalar(key)
        if name == "functions":
            functions = value
        elif name in IGNORED_TOP:
            warnings.append(f"{_where(path, key)}: '{name}' is ignored (the CLI's --url picks the stack)")
        elif name not in KNOWN_TOP:
            warnings.append(f"{_where(path, key)}: unknown field '{key.value}' is ignored")
    if functions is None:
        raise CliError(f"{path}: no 'functions' key; list the functions to deploy under it, like\n"
                       "functions:\n  hello:\n    handler: ./hello")
    if not isinstance(functions, yaml.MappingNode) or not functions.value:
        raise CliError(f"{_where(path, functions)}: 'functions' must map each function's name to its settings,"
                       " like\nfunctions:\n  hello:\n    handler: ./hello")
    entries: list[Entry] = []
    seen: set[str] = set()
    for key, spec in functions.value:
        name = _scalar(key)
        where = _where(path, key)
        if name is None:
            raise CliError(f"{where}: functions.{key.value}: a function's name must be text")
        try:
            validate_function_name(name)
        except InvalidRequest as exc:
            raise CliError(f"{where}: functions.{name}: {exc.message}") from None
        if name in seen:
            raise CliError(f"{where}: functions.{name} is listed twice")
        seen.add(name)
        if not isinstance(spec, yaml.MappingNode):
            raise CliError(f"{_where(path, spec)}: functions.{name} must be a mapping with a 'handler', like\n"
                           f"  {name}:\n    handler: ./{name}")
        handler_node: yaml.Node | None = None
        for field, value in spec.value:
            field_name = _scalar(field)
            if field_name == "handler":
                handler_node = value
            else:
                warnings.append(f"{_where(path, field)}: functions.{name}.{field.value} is ignored")
        if handler_node is None:
            raise CliError(f"{_where(path, spec)}: functions.{name}.handler is missing: name the function's folder,"
                           " .zip or .py file")
        handler = _scalar(handler_node)
        if not handler:
            raise CliError(f"{_where(path, handler_node)}: functions.{name}.handler must be a path (a folder, a .zip"
                           " or a .py file)")
        target = (path.parent / handler).resolve()
        if not target.exists():
            raise CliError(f"{_where(path, handler_node)}: functions.{name}.handler: {handler} does not exist"
                           f" (looked for {target})")
        entries.append(Entry(name, target, handler_node.start_mark.line + 1))
    return entries, warnings
