"""Confining a forked instance: namespaces of its own, its own uid, no capabilities, seccomp (Linux, ctypes).

The zygote (``zygote.py``) runs inside bubblewrap's sandbox, which already shows
the minimal file system of ``services/deployer/sandbox.py`` and none of nuclide's
state directory except ``<var>/functions`` and ``<var>/envs`` (staged there for
this module). A forked child, still holding the zygote's capabilities, narrows
that view for one instance before any user code is imported:

1. ``unshare`` mount, IPC, UTS and PID namespaces, and (unless the function asked
   for the host's network) enter the network namespace the deployer prepared for
   it (``services/deployer/netns.py``); mounts become private;
2. a fresh tmpfs on the state directory, of the instance's scratch size: it holds
   the instance's /tmp and /dev/shm (bound there) and the writable layer of each code
   directory (an overlay over the shipped code, so writes stay in the instance and
   count against the same size); the dependency environments and the gateway's
   socket directory are bound in read-only, then the staging mounts are detached and
   the tmpfs is made read-only (the mounts on it stay writable);
3. a second fork enters the PID namespace (as its PID 1), mounts its own /proc,
   starts a session, empties the capability bounding set, sets RLIMIT_NPROC (the
   process limit: it counts per uid, and the uid is the instance's own) and
   RLIMIT_DATA, switches to the instance's uid and gid (which clears every
   capability), sets no_new_privs and loads the seccomp filter (``shared/seccomp.py``);
   the zygote then forks the runtime from it and keeps PID 1 as the namespace's init.

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
CLONE_NEWNET = 0x40000000

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
SCRATCH = ".instance"  # below the state directory's tmpfs: /tmp, /dev/shm and the code's writable layers
SCRATCH_INODES = 65536  # files the scratch tmpfs may hold: empty files cost kernel memory, not bytes
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
    """What one instance may see: its code (writable layer) and environments (read-only), under the state dir."""

    var_dir: str
    writable: tuple[str, ...]
    readonly: tuple[str, ...]
    staged: tuple[str, ...]  # the zygote's staging mounts (all functions, all envs), detached in the child
    install_paths: tuple[str, ...]  # nuclide's interpreter and source, bound back if /tmp covers them
    uid: int = 0  # the instance's uid and gid (0: keep root, for the zygote's self-test only)
    scratch_bytes: int = 0  # the size of its tmpfs (/tmp, /dev/shm, writes to its code); 0: the kernel's default
    netns_fd: int = -1  # the network namespace to enter (-1: keep the zygote's, the host's)
    resolv_conf: str = ""  # what /etc/resolv.conf says in that namespace


def enter(plan: Plan) -> None:
    """Step 1-2, in the first child: new namespaces and the instance's own file system view.

    The PID namespace applies to the children of the caller: fork once more
    and call :func:`finish` in that child.
    """
    for path in (*plan.writable, *plan.readonly):
        if not _under(path, plan.var_dir):
            raise ConfineError(0, f"{path} is not below the state directory {plan.var_dir}")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    if plan.netns_fd >= 0:
        _check(_libc.setns(plan.netns_fd, CLONE_NEWNET), "enter the instance's network namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # handles first: the mounts below cover the paths they were opened through
    opened = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    keep = [(p, os.open(p, opened)) for p in plan.install_paths if _under(p, "/tmp")]
    layers = [(p, os.open(p, opened)) for p in plan.writable]
    binds = [(p, os.open(p, opened)) for p in plan.readonly]
    staged = [os.open(p, opened) for p in plan.staged if os.path.isdir(p)]
    try:
        os.makedirs(plan.var_dir, exist_ok=True)
        size = f",size={plan.scratch_bytes}" if plan.scratch_bytes else ""
        _mount("tmpfs", plan.var_dir, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,nr_inodes={SCRATCH_INODES}{size}")
        scratch = os.path.join(plan.var_dir, SCRATCH)
        for name in ("tmp", "shm"):
            os.makedirs(os.path.join(scratch, name))
            os.chmod(os.path.join(scratch, name), 0o1777)
        tmp_fd = os.open(os.path.join(scratch, "tmp"), opened)
        shm_fd = os.open(os.path.join(scratch, "shm"), opened)
        var_fd = os.open(plan.var_dir, opened)
        try:
            # /tmp may hold the state directory (tests, a checkout under /tmp): bind it back on top
            _bind_fd(tmp_fd, "/tmp", readonly=False)
            _bind_fd(shm_fd, "/dev/shm", readonly=False)
            for path, fd in keep:
                _bind_fd(fd, path, readonly=True)
            if _under(plan.var_dir, "/tmp"):
                _bind_fd(var_fd, plan.var_dir, readonly=False)
        finally:
            for fd in (tmp_fd, shm_fd, var_fd):
                os.close(fd)
        for i, (path, fd) in enumerate(layers):
            upper, work = os.path.join(scratch, f"upper{i}"), os.path.join(scratch, f"work{i}")
            os.makedirs(upper, 0o755)
            os.makedirs(work, 0o700)
            if plan.uid:
                os.chown(upper, plan.uid, plan.uid)  # the top of the merged directory: the instance's own
            os.makedirs(path, exist_ok=True)
            _mount("overlay", path, "overlay", MS_NOSUID | MS_NODEV,
                   f"lowerdir=/proc/self/fd/{fd},upperdir={upper},workdir={work}")
        for path, fd in binds:
            _bind_fd(fd, path, readonly=True)
        if plan.resolv_conf:
            resolv = os.path.join(scratch, "resolv.conf")
            with open(resolv, "w") as fh:
                fh.write(plan.resolv_conf)
            _mount(resolv, "/etc/resolv.conf", None, MS_BIND)
            _mount(None, "/etc/resolv.conf", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        for fd in staged:  # out of the mount table too, not only out of sight
            _check(_libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH), "detach a staging mount")
        # this mount only: /tmp, /dev/shm and the overlays keep writing to the same tmpfs
        _mount(None, plan.var_dir, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in [fd for _, fd in keep] + [fd for _, fd in layers] + [fd for _, fd in binds] + staged:
            os.close(fd)


def finish(memory_bytes: int, cap_last: int, uid: int = 0, pids: int = 0, seccomp_program: bytes = b"") -> None:
    """Step 3, in the PID namespace's first process: /proc, a session, its own uid, no privileges, the limits."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.setsid()
    for cap in range(cap_last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    if pids > 0:
        # counted per uid, and the uid is this instance's alone: its processes and threads
        resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears the permitted and effective capabilities
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if memory_bytes > 0:
        # RLIMIT_DATA: heap and private anonymous memory (an idle instance uses about 45 MB of it), not
        # the address space of shared libraries, which RLIMIT_AS would count
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    if seccomp_program:
        from shared.seccomp import install

        install(seccomp_program)  # last: it denies mount, which /proc needed


def cap_last() -> int:
    """The highest capability number this kernel knows (read while /proc is still the host's)."""
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        return int(fh.read())
