"""Sandboxing of user code (builds and instances) with bubblewrap, when it is available.

The sandbox sees the host's system read-only, a private /tmp, a private PID
namespace, no capabilities, and none of nuclide's state directory except the
paths bound in explicitly (the function's own directory writable, its
dependencies read-only). The network is shared: instances reach the gateway on
127.0.0.1 and builds reach the package index.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import Settings


@dataclass(frozen=True)
class Mounts:
    writable: tuple[Path, ...] = ()
    readonly: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = field(default_factory=tuple)


def bwrap_path(settings: Settings) -> str | None:
    """The bwrap binary to use, None to run unsandboxed; raises when bwrap is required but missing."""
    if settings.sandbox == "none":
        return None
    path = shutil.which("bwrap")
    if path is None and settings.sandbox == "bwrap":
        raise RuntimeError("sandbox is 'bwrap' but bwrap is not installed; apt-get install bubblewrap")
    return path


def wrap(settings: Settings, argv: list[str], mounts: Mounts, cwd: Path) -> list[str]:
    """The argv that runs ``argv`` inside the sandbox (or ``argv`` itself without bwrap)."""
    bwrap = bwrap_path(settings)
    if bwrap is None:
        return argv
    cmd = _view(bwrap, settings, mounts)
    cmd += [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--cap-drop", "ALL",
        "--new-session",
        "--chdir", str(cwd),
        "--",
        *argv,
    ]
    return cmd


def _view(bwrap: str, settings: Settings, mounts: Mounts) -> list[str]:
    """bwrap's file system arguments: the host read-only, private /tmp, the state directory hidden."""
    cmd = [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
    ]
    # the private /tmp would hide an interpreter or checkout that lives below /tmp;
    # bind them back (read-only) before the state directory is hidden again below
    for path in install_paths():
        cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--tmpfs", str(settings.var_dir.resolve())]
    for hidden in mounts.hidden:
        if hidden.exists():
            cmd += ["--tmpfs", str(hidden)]
    for path in mounts.readonly:
        cmd += ["--ro-bind", str(path), str(path)]
    for path in mounts.writable:
        cmd += ["--bind", str(path), str(path)]
    return cmd


# what a zygote keeps of root's capabilities: building namespaces and mounts (SYS_ADMIN), emptying a
# forked instance's bounding set (SETPCAP); instances drop both before user code runs
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP")


def zygote_stage(settings: Settings) -> tuple[Path, Path]:
    """The directories a zygote sees of the state directory: every function's code, every environment."""
    var = settings.var_dir.resolve()
    return var / "functions", var / "envs"


def zygote_argv(settings: Settings, argv: list[str]) -> list[str] | None:
    """The argv of a zygote under bwrap (see services/runtime/zygote.py), or None when bwrap is unavailable.

    The zygote itself runs no user code; what it forks confines itself further
    (services/runtime/confine.py) to what ``wrap`` gives a cold instance.
    """
    bwrap = bwrap_path(settings)
    if bwrap is None or os.geteuid() != 0:
        return None  # without root, bwrap cannot hand the zygote the capabilities it needs
    functions, envs = zygote_stage(settings)
    for path in (functions, envs):
        path.mkdir(parents=True, exist_ok=True)
    cmd = _view(bwrap, settings, Mounts(writable=(functions,), readonly=(envs,), hidden=hidden_paths()))
    cmd += ["--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL"]
    for cap in ZYGOTE_CAPS:
        cmd += ["--cap-add", cap]
    cmd += ["--new-session", "--die-with-parent", "--chdir", "/", "--", *argv]
    return cmd


def install_paths() -> tuple[Path, ...]:
    """Where nuclide's interpreter, its packages and its source live, as seen on the host."""
    import services

    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
             Path(services.__file__).resolve().parent.parent}
    return tuple(sorted(p for p in paths if p != Path("/")))


def hidden_paths() -> tuple[Path, ...]:
    """Places outside the state directory that hold secrets of nuclide's (the CLI's token file)."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return (config_home / "nuclide",)


def base_env(home: str = "/tmp") -> dict[str, str]:
    """A small, predictable environment for user code; nothing of nuclide's own settings leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONSTRAINT", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
