"""The function spec: nuclio's function.yaml (or a bare handler file) turned into a FunctionSpec."""

from __future__ import annotations

import ast
import datetime
import math
import re
import reprlib
import sys
import dataclasses
from typing import Any

import yaml

from shared.archive import Archive, ArchiveLimits, read_archive
from shared.triggers import DEFAULT_RETRY, max_body_bytes, parse_retry, validate_triggers
from shared.errors import InvalidRequest
from shared.handlercheck import check_handler, parse_handler
from shared.names import validate_function_name
from shared.runtimes import DEFAULT_WARM_START, parse_warm_start
from shared.units import MiB, parse_duration_s, parse_memory_bytes

HOST_RUNTIME = f"python:{sys.version_info.major}.{sys.version_info.minor}"
SPEC_FILES = ("function.yaml", "function.yml")
MAX_REQUIREMENTS_BYTES = 64 * 1024
MIN_MEMORY_BYTES = 16 * MiB
# an instance's process limit (processes and threads, spec.resources.limits.pids): a Python instance
# runs about 10 threads; 256 leaves room for worker pools and subprocesses, not for a fork bomb
DEFAULT_PIDS = 256
MAX_PIDS = 32768
# an instance's scratch space (spec.resources.limits.ephemeral-storage): its /tmp, /dev/shm and what it
# writes into its code directory, together, in memory (a tmpfs)
DEFAULT_SCRATCH_BYTES = 256 * MiB
MIN_SCRATCH_BYTES = 1 * MiB
NETWORKS = ("isolated", "host")  # spec.network: the instance's own user-mode network, or the host's
MAX_REPLICAS = 64
MAX_TIMEOUT_S = 3600.0
MAX_IDLE_TIMEOUT_S = 7 * 24 * 3600.0
# Trigger attributes are kept verbatim; a YAML alias bomb must not explode when they are copied.
_MAX_TRIGGER_NODES = 10_000
MAX_SPEC_BYTES = 256 * 1024  # function.yaml: a spec, not data; bigger files are refused before parsing
MAX_YAML_ALIASES = 64  # anchors reused more often than this look like an alias bomb, not a spec
MAX_YAML_NODES = 100_000  # values in the document once every alias is expanded

_RUNTIME_RE = re.compile(r"python(?::?(?P<major>\d+)(?:\.(?P<minor>\d+))?)?")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Options that would point pip at another index or pull in files we never checked.
# pip's parser accepts unambiguous prefixes of long options ("--ind"), so we match prefixes too.
_PIP_REFUSED_LONG = ("--editable", "--index-url", "--extra-index-url", "--trusted-host", "--find-links",
                     "--requirement", "--constraint")
_PIP_REFUSED_SHORT = ("-e", "-i", "-f", "-r", "-c")
_PIP_COMMENT_RE = re.compile(r"(^|\s)#.*$")
# what installs from somewhere other than the index: URLs, VCS links, PEP 508 direct references, local paths
_PIP_DIRECT_RE = re.compile(r"://|(^|\s)(git|hg|svn|bzr)\+|(^|\s)file:|(^|\s)[./~]")

_TOP_KNOWN = {"apiVersion", "kind", "metadata", "spec"}
_TOP_IGNORED = {"status"}
_METADATA_SILENT = {"labels", "annotations", "namespace"}
_SPEC_IGNORED = {
    "image", "imageHash", "platform", "readinessTimeoutSeconds", "waitReadinessTimeoutBeforeFailure",
    "loggerSinks", "volumes", "serviceType", "httpPort", "alias", "version", "dealer", "dataBindings",
    "runtimeAttributes", "targetCPU", "avatar", "affinity", "nodeSelector", "nodeName", "tolerations",
    "priorityClassName", "preemptionPolicy", "securityContext", "serviceAccount", "imagePullSecrets",
    "imagePullPolicy", "runRegistry", "publish", "disable", "disableDefaultHTTPTrigger",
    "customScalingMetricSpecs", "autoscaleMetrics",
}


# The key a stored spec held a registered runtime's definition under before it had its own name.
_LEGACY_RUNTIME_KEY = "shell"


def upgrade_stored(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict as read back from the store, with keys an older version wrote under other names renamed."""
    if _LEGACY_RUNTIME_KEY in spec and "registered_runtime" not in spec:
        spec = dict(spec)
        spec["registered_runtime"] = spec.pop(_LEGACY_RUNTIME_KEY)
    return spec


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    """Everything nuclide needs to build and run one function; defaults match a bare main.py."""

    name: str | None = None
    handler: str = "main:handler"
    runtime: str = HOST_RUNTIME
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    build_commands: tuple[str, ...] = ()
    requirements: str = ""
    min_replicas: int = 1
    max_replicas: int = 1
    description: str = ""
    timeout_s: float = 30.0
    max_concurrency: int = 1
    target_concurrency: int | None = None  # calls in flight per instance the autoscaler aims at; None: max_concurrency
    memory_bytes: int | None = None
    cpu: float | None = None
    pids: int | None = None  # None: DEFAULT_PIDS
    scratch_bytes: int | None = None  # None: DEFAULT_SCRATCH_BYTES
    network: str = "isolated"
    private: bool = False
    # functions outside its fusion group that may call it (context.call) while it is private; "*": any
    allow_calls_from: tuple[str, ...] = ()
    idle_timeout_s: float = 300.0
    triggers: tuple[dict, ...] = ()
    retry: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RETRY))
    warm_start: str = DEFAULT_WARM_START
    # the registered runtime's definition (image, path, dependencies, run) as it was at deploy time;
    # None for Python functions
    registered_runtime: dict[str, Any] | None = None
    lambda_event: str = "auto"  # what a handler(event, context) gets: see services/runtime/lambda_shape.py

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionSpec:
        d = upgrade_stored(d)
        # Unknown keys are dropped and missing ones defaulted: stored specs outlive code versions.
        kwargs: dict[str, Any] = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if "env" in kwargs:
            kwargs["env"] = {str(k): str(v) for k, v in (kwargs["env"] or {}).items()}
        for key in ("build_commands", "triggers", "allow_calls_from"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key] or ())
        return cls(**kwargs)


def _err(where: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"function.yaml: {where} {what}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40


def _excerpt(value: Any) -> str:
    """A short repr, bounded in work as well as length (an expanded alias may be huge)."""
    return _SHORT.repr(value)[:60]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _expect(value: Any, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    # bool is an int in Python but `replicas: true` is a mistake, not a 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _err(where, f"must be {expected}, got a bool ({value!r})")
    if not isinstance(value, kind):
        raise _err(where, f"must be {expected}, got {_type_name(value)} {_excerpt(value)}")
    return value


def _int_in(value: Any, where: str, low: int, high: int) -> int:
    _expect(value, int, where, "an integer")
    if not low <= value <= high:
        raise _err(where, f"must be between {low} and {high}, got {value}")
    return value


def _parse_cpu(value: Any, where: str) -> float:
    if isinstance(value, str) and value.strip().endswith("m"):
        number, scale = value.strip()[:-1], 1e-3
    else:
        number, scale = value, 1.0
    try:
        cpu = float(number) * scale if not isinstance(number, bool) else math.nan
    except (TypeError, ValueError):
        cpu = math.nan
    if not math.isfinite(cpu) or cpu <= 0:
        raise _err(where, f"{value!r:.60} is not a CPU amount; use e.g. '500m', '1' or 2")
    return cpu


def _parse_runtime(value: Any, runtimes: dict[str, dict[str, Any]] | None = None) -> str:
    """The host's Python runtime, another ``python:3.X`` (the deployer decides where it runs, see
    :func:`other_python`), or the name of a registered runtime (one of ``runtimes``)."""
    _expect(value, str, "spec.runtime", "a string like 'python'")
    match = _RUNTIME_RE.fullmatch(value.strip().lower())
    major, minor = sys.version_info.major, sys.version_info.minor
    if match and (match["major"] is None or (
        int(match["major"]) == major and (match["minor"] is None or int(match["minor"]) == minor)
    )):
        return HOST_RUNTIME
    if match and int(match["major"]) == 3 and match["minor"] is not None:
        return f"python:3.{int(match['minor'])}"
    if match and int(match["major"]) < 3:
        raise _err("spec.runtime", f"{value!r} is not supported: Python 2 reached its end of life; port the code"
                   f" to Python 3 and use 'python' or '{HOST_RUNTIME}'")
    if runtimes and value.strip() in runtimes:
        return value.strip()
    registered = f", or a registered runtime: {', '.join(sorted(runtimes))}" if runtimes else ""
    raise _err("spec.runtime", f"{value!r} is not available here; use 'python' or '{HOST_RUNTIME}'{registered}")


def other_python(runtime: str | None) -> str | None:
    """"3.X" when a spec's runtime is a Python 3 other than the platform's, else None."""
    if runtime and runtime != HOST_RUNTIME and runtime.startswith("python:3."):
        return runtime.partition(":")[2]
    return None


def _plain(value: Any, where: str, budget: list[int]) -> Any:
    """Copy YAML data into JSON types, bounded in size."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _err(where, "is too large; keep trigger definitions small")
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}", budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]", budget) for i, v in enumerate(value)]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise _err(where, f"has an unsupported value of type {_type_name(value)}")


def _parse_triggers(value: Any) -> tuple[dict, ...]:
    budget = [_MAX_TRIGGER_NODES]
    if isinstance(value, dict):
        items = [(f"spec.triggers.{k}", str(k), t) for k, t in value.items()]
    else:
        _expect(value, list, "spec.triggers", "a mapping of name -> trigger")
        items = []
        for i, t in enumerate(value):
            name = t.get("name") if isinstance(t, dict) else None
            if not isinstance(name, str) or not name:
                raise _err(f"spec.triggers[{i}].name", "is required and must be a string")
            items.append((f"spec.triggers[{i}]", name, t))
    triggers: list[dict] = []
    for where, name, trigger in items:
        _expect(trigger, dict, where, "a mapping with 'kind' and 'attributes'")
        kind = trigger.get("kind")
        if not isinstance(kind, str) or not kind:
            raise _err(f"{where}.kind", "is required and must be a string, e.g. 'http' or 'cron'")
        if name in {t["name"] for t in triggers}:
            raise _err(where, f"repeats trigger name {name!r}; give each trigger its own name")
        triggers.append({**_plain(trigger, where, budget), "name": name})
    return tuple(triggers)


def _parse_env(value: Any, warnings: list[str]) -> dict[str, str]:
    if isinstance(value, dict):
        items = [(f"spec.env.{k}", k, v, False) for k, v in value.items()]
    else:
        _expect(value, list, "spec.env", "a list of {name, value} or a mapping")
        items = []
        for i, item in enumerate(value):
            where = f"spec.env[{i}]"
            _expect(item, dict, where, "a mapping with 'name' and 'value'")
            if "valueFrom" in item:
                warnings.append(f"function.yaml: {where}.valueFrom is not supported by nuclide; variable skipped")
                continue
            for extra in sorted(set(map(str, item)) - {"name", "value"}):
                warnings.append(f"function.yaml: unknown field '{where}.{extra}' is ignored")
            items.append((where, item.get("name"), item.get("value"), True))
    env: dict[str, str] = {}
    for where, name, raw, listed in items:
        name_where = f"{where}.name" if listed else where
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise _err(name_where, f"{name!r} is not a valid variable name; use letters, digits and '_' "
                       "(quote names YAML reads as booleans or numbers)")
        if name.upper().startswith("NUCLIDE_"):
            raise _err(name_where, f"{name!r} is reserved: NUCLIDE_* variables are set by nuclide; rename it")
        value_where = f"{where}.value" if listed else where
        if isinstance(raw, bool):
            text = "true" if raw else "false"
        elif raw is None or isinstance(raw, (str, int, float)):
            text = "" if raw is None else str(raw)
        else:
            raise _err(value_where, f"must be a string or number, got {_type_name(raw)}")
        if "\x00" in text:
            raise _err(value_where, "contains a NUL byte, which environment variables cannot hold")
        if name in env:
            warnings.append(f"function.yaml: spec.env sets {name!r} twice; the last value is used")
        env[name] = text
    return env


def _pip_refused(token: str) -> bool:
    if token.startswith("--"):
        option = token.split("=", 1)[0]
        return len(option) > 2 and any(long.startswith(option) for long in _PIP_REFUSED_LONG)
    return token[:2] in _PIP_REFUSED_SHORT


def _parse_requirements(archive: Archive) -> str:
    raw = archive.get("requirements.txt")
    if raw is None:
        return ""
    if len(raw) > MAX_REQUIREMENTS_BYTES:
        raise InvalidRequest(f"requirements.txt is {len(raw)} bytes, over the {MAX_REQUIREMENTS_BYTES} limit; "
                             "list only the packages the function imports")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"requirements.txt is not UTF-8 text ({exc}); save it as UTF-8") from None
    # pip joins backslash-continued lines before parsing, so an option can hide on a continuation.
    logical: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        start, prefix = pending or (number, "")
        pending = (start, prefix + line[:-1]) if line.endswith("\\") else None
        if pending is None:
            logical.append((start, prefix + line))
    if pending is not None:
        logical.append(pending)
    for number, line in logical:
        requirement = _PIP_COMMENT_RE.sub("", line)
        if _PIP_DIRECT_RE.search(requirement) or "@" in requirement.split(";", 1)[0]:
            raise InvalidRequest(
                f"requirements.txt line {number}: {line.strip()!r:.120} is a direct URL, VCS link or local path;"
                " an upload installs from the package index only: name the package and its version instead"
            )
        for token in requirement.split():
            if _pip_refused(token):
                raise InvalidRequest(
                    f"requirements.txt line {number}: {line.strip()!r:.120} is not allowed: an upload cannot "
                    "change the package index or include other files; list plain requirements instead"
                )
    return text


def _infer_handler(archive: Archive, fallback_module: str | None) -> str:
    """Pick module:handler (or :handle) from top-level .py files, without running them."""
    if fallback_module:
        parse_handler(f"{fallback_module}:handler", "fallback handler")
    modules = [fallback_module] if fallback_module else [
        name[:-3] for name in archive.py_files() if "/" not in name and name[:-3].isidentifier()
    ]
    found: list[str] = []
    broken: list[str] = []
    for module in modules:
        path = module.replace(".", "/") + ".py"
        try:
            tree = ast.parse(archive.get(path) or b"", filename=path)
        except (SyntaxError, ValueError):
            broken.append(path)  # check_handler reports the exact error once a handler is chosen
            continue
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for func in ("handler", "handle"):
            if func in defined:
                found.append(f"{module}:{func}")
                break
    if fallback_module:
        return found[0] if found else f"{fallback_module}:handler"
    if len(found) == 1:
        return found[0]
    hint = "add function.yaml with spec.handler, e.g. 'main:handler'"
    if not found:
        unparsed = f" ({', '.join(broken)} could not be parsed)" if broken else ""
        raise InvalidRequest(
            f"no handler found: no top-level .py file defines handler() or handle(){unparsed}; {hint}"
        )
    raise InvalidRequest(f"several handlers found ({', '.join(found)}); {hint} to choose one")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a cap on alias uses (each one can multiply what the document expands to)."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise InvalidRequest(f"function.yaml uses more than {MAX_YAML_ALIASES} YAML aliases (*name);"
                                     " write the values out instead")
        return super().compose_node(parent, index)


def _check_expanded_size(doc: Any) -> None:
    """Refuse a document that expands (aliases followed) to more than MAX_YAML_NODES values; stops early."""
    stack, seen = [doc], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise InvalidRequest(f"function.yaml expands to more than {MAX_YAML_NODES} values once its YAML aliases"
                                 " are followed; write a smaller spec")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _load_yaml(archive: Archive, warnings: list[str]) -> dict[str, Any] | None:
    present = [name for name in SPEC_FILES if archive.get(name) is not None]
    if not present:
        return None
    if len(present) > 1:
        warnings.append("both function.yaml and function.yml exist; function.yml is ignored")
    filename = present[0]
    raw = archive.files[filename]
    if len(raw) > MAX_SPEC_BYTES:
        raise InvalidRequest(f"{filename} is {len(raw)} bytes, over the {MAX_SPEC_BYTES} byte limit; a spec holds"
                             " settings only: put data in other files of the archive")
    try:
        loader = _BoundedLoader(raw.decode("utf-8-sig"))
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{filename} is not UTF-8 text ({exc}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidRequest(f"{filename}{where}: invalid YAML ({problem}); fix the syntax") from None
    _check_expanded_size(doc)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{filename} must be a YAML mapping with 'metadata' and 'spec', got a {_type_name(doc)}")
    return doc


def _warn_unknown(mapping: dict, prefix: str, known: set[str], ignored: set[str], warnings: list[str]) -> None:
    for key in mapping:
        dotted = f"{prefix}{key}"
        if key in ignored:
            warnings.append(f"function.yaml: {dotted} is ignored by nuclide")
        elif key not in known:
            warnings.append(f"function.yaml: unknown field '{dotted}' is ignored")


def _sub(spec: dict, key: str, where: str) -> dict:
    value = spec.get(key)
    return {} if value is None else _expect(value, dict, where, "a mapping")


def _duration_in(value: Any, where: str, max_s: float) -> float:
    seconds = parse_duration_s(value, f"function.yaml: {where}")
    if not 0 < seconds <= max_s:
        raise _err(where, f"must be more than 0 and at most {max_s:.0f} seconds, got {value!r}")
    return seconds


def _parse_scaling(spec: dict, kw: dict[str, Any], warnings: list[str]) -> None:
    """Replicas, timeouts and concurrency: the fields that decide how many calls run where."""
    minimum, maximum = spec.get("minReplicas"), spec.get("maxReplicas")
    if spec.get("replicas") is not None:
        replicas = _int_in(spec["replicas"], "spec.replicas", 0, MAX_REPLICAS)
        if minimum is None and maximum is None:
            minimum = maximum = replicas
        else:
            warnings.append("function.yaml: spec.replicas is ignored because spec.minReplicas/maxReplicas are set")
    kw["min_replicas"] = 1 if minimum is None else _int_in(minimum, "spec.minReplicas", 0, MAX_REPLICAS)
    kw["max_replicas"] = (max(kw["min_replicas"], 1) if maximum is None
                          else _int_in(maximum, "spec.maxReplicas", 1, MAX_REPLICAS))
    if kw["min_replicas"] > kw["max_replicas"]:
        raise _err("spec.minReplicas", f"({kw['min_replicas']}) must not exceed spec.maxReplicas ({kw['max_replicas']})")
    # eventTimeout is nuclio's own name for the per-call timeout.
    timeouts = [key for key in ("timeout", "timeoutSeconds", "eventTimeout") if spec.get(key) is not None]
    if timeouts:
        kw["timeout_s"] = _duration_in(spec[timeouts[0]], f"spec.{timeouts[0]}", MAX_TIMEOUT_S)
        for other in timeouts[1:]:
            warnings.append(f"function.yaml: spec.{other} is ignored because spec.{timeouts[0]} is set")
    if spec.get("maxConcurrency") is not None:
        kw["max_concurrency"] = _int_in(spec["maxConcurrency"], "spec.maxConcurrency", 1, 1024)
    if spec.get("targetConcurrency") is not None:
        kw["target_concurrency"] = _int_in(spec["targetConcurrency"], "spec.targetConcurrency", 1, 1024)
    scale_to_zero = _sub(spec, "scaleToZero", "spec.scaleToZero")
    _warn_unknown(scale_to_zero, "spec.scaleToZero.", {"idleTimeout"}, set(scale_to_zero) - {"idleTimeout"}, warnings)
    for where, value in (("spec.scaleToZero.idleTimeout", scale_to_zero.get("idleTimeout")),
                         ("spec.idleTimeout", spec.get("idleTimeout"))):
        if value is not None:
            kw["idle_timeout_s"] = _duration_in(value, where, MAX_IDLE_TIMEOUT_S)
            break


def _parse_resources(spec: dict, kw: dict[str, Any], warnings: list[str]) -> None:
    resources = _sub(spec, "resources", "spec.resources")
    _warn_unknown(resources, "spec.resources.", {"limits"}, {"requests", "claims"}, warnings)
    limits = _sub(resources, "limits", "spec.resources.limits")
    known = {"memory", "cpu", "pids", "ephemeral-storage"}
    _warn_unknown(limits, "spec.resources.limits.", known, set(limits) - known, warnings)
    if limits.get("memory") is not None:
        where = "function.yaml: spec.resources.limits.memory"
        kw["memory_bytes"] = parse_memory_bytes(limits["memory"], where)
        if kw["memory_bytes"] < MIN_MEMORY_BYTES:
            raise InvalidRequest(f"{where} must be at least 16Mi, got {limits['memory']!r}")
    if limits.get("cpu") is not None:
        kw["cpu"] = _parse_cpu(limits["cpu"], "spec.resources.limits.cpu")
    if limits.get("pids") is not None:
        kw["pids"] = _int_in(limits["pids"], "spec.resources.limits.pids", 16, MAX_PIDS)
    if limits.get("ephemeral-storage") is not None:
        where = "function.yaml: spec.resources.limits.ephemeral-storage"
        kw["scratch_bytes"] = parse_memory_bytes(limits["ephemeral-storage"], where)
        if kw["scratch_bytes"] < MIN_SCRATCH_BYTES:
            raise InvalidRequest(f"{where} must be at least 1Mi, got {limits['ephemeral-storage']!r}")


_SPEC_KNOWN = {"handler", "runtime", "env", "build", "minReplicas", "maxReplicas", "replicas", "description",
               "timeout", "timeoutSeconds", "eventTimeout", "maxConcurrency", "targetConcurrency", "resources",
               "private", "scaleToZero", "idleTimeout", "triggers", "retry", "warmStart", "lambdaEvent", "network",
               "allowCallsFrom"}
LAMBDA_EVENT_SHAPES = ("auto", "payload", "apigateway")


def _parse_registered_runtime(spec: dict, kw: dict[str, Any], definition: dict[str, Any], warnings: list[str]) -> None:
    """A function of a registered runtime: its `run` command is the handler; its code, the whole archive."""
    kw["registered_runtime"] = {k: definition[k] for k in ("image", "image_id", "path", "dependencies", "run") if k in definition}
    kw["handler"] = ""
    kw["requirements"] = ""  # the runtime's `dependencies` command reads the archive's files itself
    for key in ("handler", "build"):
        if spec.get(key) is not None:
            warnings.append(f"function.yaml: spec.{key} is ignored: runtime '{kw['runtime']}' runs its own"
                            " `run` and `dependencies` commands")


MAX_ALLOW_CALLS_FROM = 256


def parse_allow_calls_from(value: Any) -> tuple[str, ...]:
    """spec.allowCallsFrom: function names (or "*", any function) that may call a private function."""
    where = "spec.allowCallsFrom"
    names = _expect(value, list, where, 'a list of function names (or ["*"] for any function)')
    if len(names) > MAX_ALLOW_CALLS_FROM:
        raise _err(where, f"names {len(names)} functions, over the limit of {MAX_ALLOW_CALLS_FROM}; use [\"*\"]"
                          " to let any function call it")
    out: list[str] = []
    for i, name in enumerate(names):
        name = _expect(name, str, f"{where}[{i}]", 'a function name or "*"')
        if name != "*":
            try:
                validate_function_name(name)
            except InvalidRequest as exc:
                raise _err(f"{where}[{i}]", f"is not a function name: {exc.message}") from None
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_function(archive: Archive, *, fallback_handler_module: str | None = None,
                   runtimes: dict[str, dict[str, Any]] | None = None,
                   max_body_ceiling: int | None = None) -> tuple[FunctionSpec, list[str]]:
    """Read function.yaml (or infer a handler) and requirements.txt; return (spec, warnings).

    ``runtimes`` are the registered runtimes (name -> definition) spec.runtime may name;
    ``max_body_ceiling`` the most an http trigger's maxRequestBodySize may ask for.
    """
    warnings: list[str] = []
    doc = _load_yaml(archive, warnings)
    spec_doc = doc.get("spec") if isinstance(doc, dict) else None
    runtime_name = spec_doc.get("runtime") if isinstance(spec_doc, dict) else None
    runtime_def = None
    if runtime_name is not None:
        runtime_name = _parse_runtime(runtime_name, runtimes)
        runtime_def = (runtimes or {}).get(runtime_name) if runtime_name != HOST_RUNTIME else None
    kw: dict[str, Any] = {"requirements": "" if runtime_def else _parse_requirements(archive)}
    if doc is None:
        kw["handler"] = _infer_handler(archive, fallback_handler_module)
        return FunctionSpec(**kw), warnings
    _warn_unknown(doc, "", _TOP_KNOWN, _TOP_IGNORED, warnings)
    metadata = _sub(doc, "metadata", "metadata")
    _warn_unknown(metadata, "metadata.", {"name"} | _METADATA_SILENT, set(), warnings)
    if metadata.get("name") is not None:
        name = _expect(metadata["name"], str, "metadata.name", "a string")
        try:
            kw["name"] = validate_function_name(name)
        except InvalidRequest as exc:
            raise InvalidRequest(f"function.yaml: metadata.name: {exc.message}") from None
    spec = _sub(doc, "spec", "spec")
    _warn_unknown(spec, "spec.", _SPEC_KNOWN, _SPEC_IGNORED, warnings)

    if runtime_def is not None:
        kw["runtime"] = runtime_name
        _parse_registered_runtime(spec, kw, runtime_def, warnings)
    elif spec.get("handler") is not None:
        kw["handler"] = parse_handler(spec["handler"], "function.yaml: spec.handler")
    else:
        try:
            kw["handler"] = _infer_handler(archive, fallback_handler_module)
        except InvalidRequest:
            raise _err("spec.handler", "is required, e.g. 'main:handler'") from None
        warnings.append(f"function.yaml: spec.handler missing; using {kw['handler']!r}")
    if runtime_name is not None and runtime_def is None:
        kw["runtime"] = runtime_name
    if spec.get("warmStart") is not None:
        kw["warm_start"] = parse_warm_start(spec["warmStart"], "function.yaml: spec.warmStart")
    if spec.get("lambdaEvent") is not None:
        shape = spec["lambdaEvent"]
        if shape not in LAMBDA_EVENT_SHAPES:
            raise _err("spec.lambdaEvent", f"must be one of {', '.join(LAMBDA_EVENT_SHAPES)} (what a"
                       f" handler(event, context) gets), got {shape!r:.60}")
        kw["lambda_event"] = shape
    if spec.get("env") is not None:
        kw["env"] = _parse_env(spec["env"], warnings)
    build = _sub(spec, "build", "spec.build")
    _warn_unknown(build, "spec.build.", {"commands"}, set(build) - {"commands"}, warnings)
    commands = _expect(build.get("commands") or [], list, "spec.build.commands", "a list of shell commands")
    if runtime_def is None:
        kw["build_commands"] = tuple(_expect(c, str, f"spec.build.commands[{i}]", "a string")
                                     for i, c in enumerate(commands))
    if spec.get("description") is not None:
        kw["description"] = _expect(spec["description"], str, "spec.description", "a string")
    if spec.get("private") is not None:
        kw["private"] = _expect(spec["private"], bool, "spec.private", "true or false")
    if spec.get("allowCallsFrom") is not None:
        kw["allow_calls_from"] = parse_allow_calls_from(spec["allowCallsFrom"])
        if kw["allow_calls_from"] and not kw.get("private"):
            warnings.append("spec.allowCallsFrom has no effect: the function is not private, so any function may"
                            " call it; set spec.private: true to limit its callers")
    if spec.get("network") is not None:
        if spec["network"] not in NETWORKS:
            raise _err("spec.network", f"must be one of {', '.join(NETWORKS)} (isolated, the default: outbound"
                       f" connections only, nothing on the host; host: the host's network), got {spec['network']!r:.60}")
        kw["network"] = spec["network"]
    _parse_scaling(spec, kw, warnings)
    _parse_resources(spec, kw, warnings)
    if spec.get("triggers") is not None:
        kw["triggers"] = _parse_triggers(spec["triggers"])
        asked = max_body_bytes(validate_triggers(kw["triggers"], warnings))
        if asked is not None and max_body_ceiling is not None and asked[0] > max_body_ceiling:
            raise _err(f"spec.triggers.{asked[1]}.attributes.maxRequestBodySize",
                       f"({asked[0]} bytes) is over the platform's ceiling of {max_body_ceiling} bytes"
                       " (max_body_ceiling_bytes); ask for less, or have the operator raise the ceiling")
    kw["retry"] = parse_retry(spec.get("retry"))
    return FunctionSpec(**kw), warnings


def read_function(data: bytes, runtimes: dict[str, dict[str, Any]] | None, max_zip_bytes: int,
                  max_body_ceiling: int | None = None) -> tuple[FunctionSpec, list[str]]:
    """An uploaded zip checked whole: the archive, its spec and its handler; (spec, warnings)."""
    archive = read_archive(data, ArchiveLimits(max_zip_bytes=max_zip_bytes))
    spec, warnings = parse_function(archive, runtimes=runtimes, max_body_ceiling=max_body_ceiling)
    if spec.registered_runtime is None:
        check_handler(archive, spec.handler)
    return spec, warnings
