"""Registered runtimes: what a definition may look like, and the warm-start policies that run it.

A runtime (``PUT /runtimes/{name}``) is a local image, the directory the function's code goes
to, the command that installs its dependencies at build time and the command that runs one call
(nuclio's "shell" runtime). Commands are argv lists; a string is split with :func:`shlex.split`
and is never handed to a shell, so nothing in it (or in a call's input) is interpolated.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from typing import Any

from shared.errors import InvalidRequest
from shared.names import validate_function_name

FIELDS = ("image", "path", "dependencies", "run")
WARM_START_POLICIES = ("none", "runtime", "function")
DEFAULT_WARM_START = "function"
MAX_ARGV = 256
MAX_ARG_CHARS = 4096
# what a reference to a local image may look like: [registry/]repo[:tag] or [repo@]sha256:<hex>
_IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}(@sha256:[0-9a-f]{64})?|sha256:[0-9a-f]{64}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]{0,254}")
# the built-in runtime's spellings: a registered name may not shadow them
_PYTHON_RE = re.compile(r"python[0-9.:]*", re.IGNORECASE)
# where the code may not go: the container's own system directories and what nuclide mounts
_FORBIDDEN_PATHS = ("/", "/bin", "/sbin", "/usr", "/lib", "/lib64", "/etc", "/dev", "/proc", "/sys", "/tmp",
                    "/nuclide", "/var/run", "/run")


def validate_runtime_name(name: Any) -> str:
    try:
        validate_function_name(name)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message.replace("function name", "runtime name", 1)) from None
    if _PYTHON_RE.fullmatch(name):
        raise InvalidRequest(f"runtime name {name!r} is the built-in Python runtime's; choose another name")
    return name


def parse_argv(value: Any, where: str, *, required: bool) -> list[str]:
    """An argv list from a list of strings, or from a string split like a shell would (never run by one)."""
    if value is None or value == "" or value == []:
        if required:
            raise InvalidRequest(f"{where} is required: the command as a list of strings, e.g. [\"python3\", \"main.py\"]")
        return []
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise InvalidRequest(f"{where} {value!r:.80} cannot be split into arguments ({exc});"
                                 " give it as a list of strings") from None
    elif isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        argv = list(value)
    else:
        raise InvalidRequest(f"{where} must be a list of strings (an argv) or a command string, got {value!r:.80}")
    if not argv or not argv[0]:
        raise InvalidRequest(f"{where} needs a program to run as its first argument")
    if len(argv) > MAX_ARGV or any(len(arg) > MAX_ARG_CHARS or "\x00" in arg for arg in argv):
        raise InvalidRequest(f"{where} is too long or contains a NUL byte: at most {MAX_ARGV} arguments"
                             f" of {MAX_ARG_CHARS} characters")
    return argv


def parse_runtime(name: Any, body: Any) -> dict[str, Any]:
    """A runtime definition from a PUT body: ``{name, image, path, dependencies, run}``, normalised."""
    validate_runtime_name(name)
    if not isinstance(body, dict):
        raise InvalidRequest('a runtime is a JSON object like {"image": "myimage:1", "path": "/ws",'
                             ' "dependencies": ["pip3", "install", "-r", "requirements.txt"], "run": ["python3", "main.py"]}')
    unknown = sorted(set(map(str, body)) - set(FIELDS) - {"name"})
    if unknown:
        raise InvalidRequest(f"unknown runtime fields: {', '.join(unknown)}; a runtime has {', '.join(FIELDS)}")
    image = body.get("image")
    if not isinstance(image, str) or not _IMAGE_RE.fullmatch(image):
        raise InvalidRequest(f"image {image!r:.80} is not a local image reference like 'myruntime:1' (lower case"
                             " letters, digits, '.', '_', '-', '/', ':')")
    path = body.get("path")
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
        raise InvalidRequest(f"path {path!r:.80} must be an absolute directory in the image of letters, digits,"
                             " '.', '_', '-' and '/', e.g. '/ws'")
    path = posixpath.normpath(path)
    if path in _FORBIDDEN_PATHS or any(path.startswith(p + "/") for p in ("/proc", "/sys", "/dev", "/nuclide", "/tmp")):
        raise InvalidRequest(f"path {path!r} is a system directory; use a directory of its own, e.g. '/ws'")
    return {
        "name": name,
        "image": image,
        "path": path,
        "dependencies": parse_argv(body.get("dependencies"), "dependencies", required=False),
        "run": parse_argv(body.get("run"), "run", required=True),
    }


def parse_warm_start(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in WARM_START_POLICIES:
        raise InvalidRequest(f"{where} must be one of {', '.join(WARM_START_POLICIES)}, got {value!r:.60}")
    return value.strip().lower()


def warm_start_problem(backend: str, policy: str) -> str | None:
    """Why a Python function's warm-start policy cannot run on a backend, or None when it can."""
    if policy == DEFAULT_WARM_START or backend == "docker":
        return None
    return (f"spec.warmStart {policy!r} runs each call in a container of its own and needs the docker backend; this"
            f" deployer uses the '{backend}' backend (set NUCLIDE_BACKEND=docker, or use warmStart"
            f" '{DEFAULT_WARM_START}')")
