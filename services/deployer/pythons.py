"""Other Python 3 interpreters on this host, for functions whose spec.runtime asks for one (``python:3.X``).

An interpreter is usable when ``python3.X`` is on the deployer's PATH and can import what an instance
needs: pyzmq and msgpack (installed for that interpreter, e.g. Debian's python3-zmq and python3-msgpack
of a release that ships it) and nuclide's runtime package from this checkout. The answer is kept for
the deployer's life: installing an interpreter takes a deployer restart to be seen.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the services package
PROBE = "import zmq, msgpack, services.runtime.loop"
PROBE_TIMEOUT_S = 20.0
HOST_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

_found: dict[str, tuple[str | None, str]] = {}


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process of another interpreter: nuclide's packages come from the checkout."""
    return {**env, "PYTHONPATH": str(ROOT)}


async def find(version: str, spawn: Callable[..., Awaitable[Any]] = asyncio.create_subprocess_exec
               ) -> tuple[str | None, str]:
    """(the interpreter's path, what runs it) or (None, why not) for Python ``version`` ("3.X").

    ``spawn`` starts the probe: the deployer's Children.exec, so its sweep knows the child."""
    if version == HOST_VERSION:
        return sys.executable, f"the platform's Python {HOST_VERSION}"
    if version in _found:
        return _found[version]
    path = shutil.which(f"python{version}")
    if path is None:
        found: tuple[str | None, str] = (None, f"no python{version} on the deployer's PATH")
    else:
        proc = await spawn(
            path, "-c", PROBE, cwd=str(ROOT), env=child_env({"PATH": "/usr/local/bin:/usr/bin:/bin"}),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            err, proc.returncode = b"it did not answer", 1  # type: ignore[misc]
        if proc.returncode == 0:
            found = (path, f"{path}")
        else:
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            found = (None, f"{path} cannot run nuclide's runtime: {last[0][:200]} (it needs pyzmq and msgpack"
                           " for that interpreter)")
    _found[version] = found
    return found
