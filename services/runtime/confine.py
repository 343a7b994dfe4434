"""Confining a forked instance: its own mount, PID, IPC and UTS namespaces, then no capabilities (Linux, ctypes).

The zygote (``zygote.py``) runs inside bubblewrap's sandbox, which already shows
the host read-only, a minimal /dev and none of nuclide's state directory except
``<var>/functions`` and ``<var>/envs`` (staged there for this module). A forked
child, still holding the zygote's capabilities, narrows that view for one
instance before any user code is imported:

1. ``unshare`` mount, IPC, UTS and PID namespaces; mounts become private;
2. a fresh tmpfs on /tmp (nuclide's own files below /tmp are bound back read-only);
3. a fresh tmpfs on the state directory with only the instance's code
   directories (writable) and dependency environments (read-only) bound in,
   then the staging mounts are detached and the tmpfs is made read-only;
4. a second fork enters the PID namespace (as its PID 1), mounts its own /proc,
   starts a session, drops every capability (bounding, ambient, effective,
   permitted, inheritable), sets no_new_privs and RLIMIT_DATA; the zygote then
   forks the runtime from it and keeps PID 1 as the namespace's init.

That is what ``sandbox.wrap`` gives a cold instance (bwrap with --cap-drop ALL,
--unshare-pid/ipc/uts, --new-session), built from the same kind of calls.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class ConfineError(OSError):
    """A namespace, mount or capability step failed: the instance must not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise ConfineError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def _bind_fd(fd: int, target: str, readonly: bool) -> None:
    """Bind what ``fd`` (an O_PATH handle opened before ``target``'s parent was covered) refers to onto ``target``."""
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    if readonly:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def set_name(name: str) -> None:
    """The process name ps shows (15 bytes)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@dataclass(frozen=True)
class Plan:
    """What one instance may see: its code (writable) and environments (read-only), under the state dir."""

    var_dir: str
    writable: tuple[str, ...]
    readonly: tuple[str, ...]
    staged: tuple[str, ...]  # the zygote's staging mounts (all functions, all envs), detached in the child
    install_paths: tuple[str, ...]  # nuclide's interpreter and source, bound back if /tmp covers them


def enter(plan: Plan) -> None:
    """Step 1-3, in the first child: new namespaces and the instance's own file system view.

    The PID namespace applies to the children of the caller: fork once more
    and call :func:`finish` in that child.
    """
    for path in (*plan.writable, *plan.readonly):
        if not _under(path, plan.var_dir):
            raise ConfineError(0, f"{path} is not below the state directory {plan.var_dir}")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # handles first: the mounts below cover the paths they were opened through
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    keep = [(p, os.open(p, flags)) for p in plan.install_paths if _under(p, "/tmp")]
    binds = [(p, os.open(p, flags), False) for p in plan.writable] + [(p, os.open(p, flags), True) for p in plan.readonly]
    staged = [os.open(p, flags) for p in plan.staged if os.path.isdir(p)]
    try:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for path, fd in keep:
            _bind_fd(fd, path, readonly=True)
        os.makedirs(plan.var_dir, exist_ok=True)
        _mount("tmpfs", plan.var_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        for path, fd, readonly in binds:
            _bind_fd(fd, path, readonly)
        for fd in staged:  # out of the mount table too, not only out of sight
            _check(_libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH), "detach a staging mount")
        _mount(None, plan.var_dir, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755")
    finally:
        for fd in [fd for _, fd in keep] + [fd for _, fd, _ in binds] + staged:
            os.close(fd)


def finish(memory_bytes: int, cap_last: int) -> None:
    """Step 4, in the PID namespace's first process: /proc, a session, no privileges, the memory limit."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.setsid()
    for cap in range(cap_last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if memory_bytes > 0:
        # RLIMIT_DATA: heap and private anonymous memory, as the cold path sets it (see backends/process.py)
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))


def cap_last() -> int:
    """The highest capability number this kernel knows (read while /proc is still the host's)."""
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        return int(fh.read())
