"""An instance's seccomp filter: the calls a function never needs fail with EPERM (built by the deployer).

The filter is a deny list, as Docker's and systemd's defaults are: a Python function
and its C extensions use a wide and growing set of calls (io_uring aside), so an allow
list would break ordinary code with every new library, while what must be denied is
short and stable. libseccomp (Debian's libseccomp2, through the ``pyseccomp`` ctypes
binding) turns the names into the kernel's BPF for this architecture, once per zygote
(about a millisecond); every forked instance then only loads those bytes
(:func:`install`), so the fork path pays a single ``prctl``.

A denied call fails with EPERM (ENOSYS for ``clone3``, so that glibc falls back to
``clone``, whose flags the filter can see), never kills the process: a library that
probes for a feature gets a clean error.
"""

from __future__ import annotations

import ctypes
import errno
import tempfile

# Calls that change the system, another process or the sandbox itself; none is needed to
# run Python code, talk over sockets or start subprocesses.
DENIED = (
    # mounts and the view of the file system
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    # new namespaces or entering others (clone with CLONE_NEW* flags: see CLONE_NEW_FLAGS)
    "unshare", "setns",
    # tracing and reading other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "bpf",
    "perf_event_open", "userfaultfd", "syslog", "acct", "swapon", "swapoff", "quotactl", "quotactl_fd",
    "lookup_dcookie", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "nfsservctl", "vhangup",
    # the kernel keyring: shared by every process of a uid, a way around the other walls
    "keyctl", "add_key", "request_key",
    # names of files by handle bypass the mount view
    "open_by_handle_at", "name_to_handle_at",
)
CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def compile_filter() -> bytes:
    """The filter as the kernel's BPF program for this machine's architecture."""
    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # a call this architecture does not have (iopl on arm64, ...)
    for flag in CLONE_NEW_FLAGS.values():
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as fh:
        filt.export_bpf(fh)
        fh.seek(0)
        return fh.read()


IO_URING_CALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def deny_io_uring() -> None:
    """Make io_uring unavailable to this process and every process it starts (ENOSYS, "not supported").

    For the platform's own services, which run on uvloop: its libuv sends every epoll
    change through an io_uring ring when the kernel has one, and aborts the whole
    process (SIGABRT, no message) when the kernel takes fewer of the queued changes
    than it was given. That happened about once in a thousand service starts on a
    loaded 2-core machine (a core dump showed ``uv__epoll_ctl_flush`` with 4 changes
    queued). Without io_uring, libuv makes the same changes with plain ``epoll_ctl``
    calls, which report errors instead. The services use io_uring for nothing else.

    Loaded without no_new_privs when the process may (root with CAP_SYS_ADMIN), so
    set-user-ID programs the services start keep working; otherwise no_new_privs is
    set, as the kernel requires. Raises OSError (or ImportError without libseccomp).
    """
    import pyseccomp as seccomp

    def build(nnp: bool) -> "seccomp.SyscallFilter":
        filt = seccomp.SyscallFilter(seccomp.ALLOW)
        filt.set_attr(seccomp.Attr.CTL_NNP, int(nnp))
        filt.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        for name in IO_URING_CALLS:
            filt.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
        return filt

    try:
        build(nnp=False).load()
    except OSError:  # EACCES: only CAP_SYS_ADMIN may load a filter without no_new_privs
        build(nnp=True).load()


def install(program: bytes) -> None:
    """Load a compiled filter into this thread (and every process it starts); needs no_new_privs first."""
    if not program or len(program) % BPF_INSTRUCTION_BYTES:
        raise ValueError("not a BPF program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // BPF_INSTRUCTION_BYTES, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the seccomp filter: {errno.errorcode.get(err, err)}")
