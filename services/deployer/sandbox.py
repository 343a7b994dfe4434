"""Sandboxing of user code (builds and instances) with bubblewrap, and what the sandbox needs.

Everything user code runs in sees a minimal file system built on an empty root:
the interpreter and its libraries (``/usr``, the Python installation, nuclide's
source), CA certificates and the few files of ``/etc`` that name resolution and TLS
read, a private ``/dev``, ``/proc`` and ``/tmp``, and of nuclide's state directory
only the paths bound in explicitly. Not there: the rest of ``/etc`` (``shadow``,
``ssl/private``), ``/root``, ``/home``, ``/var`` and ``/run`` (the Docker socket),
every other function's code. Builds run in that view as a bwrap command (``wrap``)
with the host's network (they fetch packages). Instances are forked by a zygote
(``zygote_argv``, ``services/runtime/confine.py``), which narrows the view further
per instance and drops to a uid of the instance's own (:func:`instance_uid`).

The process backend refuses to start instances when the sandbox cannot be had
(:func:`problem`), unless the operator turned it off with ``sandbox: none``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import Settings
from shared.errors import BuildFailed

# what /etc the sandbox shows: name resolution, TLS trust, time zone, the dynamic linker;
# never /etc/ssl/private, shadow or anything else
ETC_FILES = ("resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "localtime", "mime.types",
             "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl/certs", "ssl/openssl.cnf", "ca-certificates",
             "pki/tls/certs", "pki/ca-trust", "alternatives", "protocols", "services")
# top-level directories that hold programs and libraries (symlinks into /usr on merged-/usr systems)
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# an instance's uid: fixed per instance id, from a range no login user or subordinate-id range of
# a distribution's defaults uses, so that its process limit (RLIMIT_NPROC counts per uid) and its
# files are its own
INSTANCE_UID_BASE = 1 << 30
INSTANCE_UID_SPAN = 1 << 28


class SandboxUnavailable(BuildFailed):
    """The process backend's sandbox cannot be set up here; says what to install or set (a failed deploy)."""


@dataclass(frozen=True)
class Mounts:
    writable: tuple[Path, ...] = ()
    readonly: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = field(default_factory=tuple)


def bwrap_path(settings: Settings) -> str | None:
    """The bwrap binary to use, None when the operator turned the sandbox off; raises when it is missing."""
    if settings.sandbox == "none":
        return None
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"the process backend's sandbox needs bubblewrap, which is not installed: {INSTALL_HOW}")
    return path


INSTALL_HOW = ("apt-get install bubblewrap slirp4netns (or run `make run` as root, which installs them), or set"
               " NUCLIDE_SANDBOX=none to run functions unsandboxed on a host you trust them with")


def problem(settings: Settings) -> str | None:
    """Why instances cannot be sandboxed here (what to do about it), or None; None too with ``sandbox: none``."""
    if settings.sandbox == "none":
        return None
    missing = [tool for tool in ("bwrap", "slirp4netns") if shutil.which(tool) is None]
    if missing:
        return f"the process backend's sandbox needs {' and '.join(missing)}, not installed here: {INSTALL_HOW}"
    if importlib.util.find_spec("pyseccomp") is None:
        return ("the process backend's sandbox needs the Python package pyseccomp (its seccomp filter), missing"
                " from nuclide's environment: `make install`, or set NUCLIDE_SANDBOX=none")
    if os.geteuid() != 0:
        return ("the process backend's sandbox runs each instance as a uid of its own, which needs the deployer to"
                " run as root (`sudo nuclide up`), or set NUCLIDE_SANDBOX=none to run functions unsandboxed")
    return None


def instance_uid(instance_id: str) -> int:
    """The uid an instance runs as: the same for the same id, distinct between instances (a 28-bit hash)."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return INSTANCE_UID_BASE + int.from_bytes(digest[:4], "big") % INSTANCE_UID_SPAN


def wrap(settings: Settings, argv: list[str], mounts: Mounts, cwd: Path, resolv_conf: Path | None = None) -> list[str]:
    """The argv that runs ``argv`` (a build step) inside the sandbox, or ``argv`` itself with ``sandbox: none``;
    ``resolv_conf`` replaces the host's (a build in a network namespace of its own asks slirp4netns's DNS)."""
    bwrap = bwrap_path(settings)
    if bwrap is None:
        return argv
    cmd = _view(bwrap, settings, mounts)
    if resolv_conf is not None:
        cmd += ["--ro-bind", str(resolv_conf), "/etc/resolv.conf"]
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
    """bwrap's file system arguments: the minimal view, a private /tmp, the state directory hidden."""
    system: list[str] = []
    for name in SYSTEM_DIRS:
        path = Path("/") / name
        if path.is_symlink():
            system += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            system += ["--ro-bind", str(path), str(path)]
    readonly = [Path("/etc") / name for name in ETC_FILES if (Path("/etc") / name).exists()]
    readonly += operator_paths()
    readonly += install_paths()
    var = settings.var_dir.resolve()
    shown = (*readonly, *mounts.readonly, *mounts.writable)
    # a secret's place needs covering only where a bound directory would show it (a home under /tmp)
    hidden = [p for p in mounts.hidden if p.exists() and _under_any(p, shown)]
    cmd = [bwrap, *system, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    cmd += _parents([*readonly, var, *hidden, *mounts.readonly, *mounts.writable])
    for path in readonly:
        cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--tmpfs", str(var)]
    for path in hidden:
        cmd += ["--tmpfs", str(path)]
    for path in mounts.readonly:
        cmd += ["--ro-bind", str(path), str(path)]
    for path in mounts.writable:
        cmd += ["--bind", str(path), str(path)]
    return cmd


def _parents(targets: list[Path]) -> list[str]:
    """Directories leading to ``targets`` made traversable: bwrap would create them mode 0700 (``/root``,
    ``/etc``), which only uid 0 could pass, and instances run as a uid of their own."""
    mounted = (Path("/dev"), Path("/proc"), *(Path("/") / name for name in SYSTEM_DIRS))
    # (below /tmp, a fresh tmpfs, parents are made like anywhere else)
    made = {Path("/"), Path("/tmp")}
    cmd: list[str] = []
    for target in targets:
        for parent in reversed(target.parents):
            # a parent that is itself a target, or lies in one or in a system directory, is there already
            if parent in made or _under_any(parent, (*mounted, *targets)):
                continue
            made.add(parent)
            cmd += ["--perms", "0755", "--dir", str(parent)]
    return cmd


# settings of the operator's that name local files builds read: a CA bundle (a TLS-intercepting
# proxy's, say), a wheel directory or a constraints file (PIP_FIND_LINKS may list several)
OPERATOR_PATH_KEYS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "SSL_CERT_DIR", "PIP_FIND_LINKS",
                      "PIP_CONSTRAINT")


def operator_paths() -> list[Path]:
    """The local files and directories the operator's settings name, for the view (read-only)."""
    found: list[Path] = []
    for key in OPERATOR_PATH_KEYS:
        for value in os.environ.get(key, "").split():
            path = Path(value[len("file://"):] if value.startswith("file://") else value)
            if path.is_absolute() and path.exists() and not _under_any(path, (Path("/usr"), Path("/etc"))) \
                    and path not in found:
                found.append(path)
    return found


def _under_any(path: Path, parents: tuple[Path, ...]) -> bool:
    return any(path == p or p in path.parents for p in parents)


# what a zygote keeps of root's capabilities: building namespaces and mounts (SYS_ADMIN), emptying a
# forked instance's bounding set (SETPCAP), switching it to its own uid (SETUID, SETGID), giving its
# code directory's writable layer to that uid (CHOWN); an overlay acts with its mounter's credentials,
# so writing the instance's files into that layer needs DAC_OVERRIDE and FOWNER. Instances drop them
# all before user code runs
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
               "CAP_FOWNER")


def zygote_stage(settings: Settings) -> tuple[Path, Path]:
    """The directories a zygote sees of the state directory: every function's code, every environment."""
    var = settings.var_dir.resolve()
    return var / "functions", var / "envs"


def zygote_argv(settings: Settings, argv: list[str], readonly: tuple[Path, ...] = ()) -> list[str] | None:
    """The argv of a zygote under bwrap (see services/runtime/zygote.py), or None when bwrap is unavailable.

    The zygote itself runs no user code; what it forks confines itself further
    (services/runtime/confine.py) to what ``wrap`` gives a cold instance.
    """
    bwrap = bwrap_path(settings)
    if bwrap is None or os.geteuid() != 0:
        return None  # without root, bwrap cannot hand the zygote the capabilities it needs
    link_dir(settings).mkdir(parents=True, exist_ok=True)
    functions, envs = zygote_stage(settings)
    for path in (functions, envs):
        path.mkdir(parents=True, exist_ok=True)
    cmd = _view(bwrap, settings, Mounts(writable=(functions,), readonly=(envs, link_dir(settings), *readonly),
                                        hidden=hidden_paths()))
    cmd += ["--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL"]
    for cap in ZYGOTE_CAPS:
        cmd += ["--cap-add", cap]
    cmd += ["--new-session", "--die-with-parent", "--chdir", "/", "--", *argv]
    return cmd


def interpreter_paths(python: str) -> tuple[Path, ...]:
    """What the view needs besides itself for another interpreter (``spec.runtime: python:3.X``): the
    directory it is named in and, for an installation outside the system's, its prefix."""
    named = Path(python).parent
    real = Path(os.path.realpath(python)).parent.parent
    found = {named} | ({real} if (real / "lib").is_dir() else set())
    system = tuple(Path("/") / name for name in SYSTEM_DIRS)
    return tuple(sorted(p for p in found if p != Path("/") and not _under_any(p, system)))


def link_dir(settings: Settings) -> Path:
    """The directory of the gateway's instance socket (``Settings.instance_link``), bound into instances."""
    return Path(settings.instance_link[len("ipc://"):]).parent


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
