"""Network namespaces for isolated instances, made ahead of need: each with its slirp4netns up already.

An isolated instance (``spec.network: isolated``, the default) gets a network namespace
of its own whose only way out is slirp4netns: a user-mode TCP/IP stack in a process of
the host's, started with host loopback disabled, so the instance can connect outside
but to nothing on the host's loopback. Creating the namespace is quick, but slirp4netns
takes about 10 ms to come up (more on a busy machine), which a wake-up from zero would
wait for. So the deployer keeps ``POOL_SIZE`` of them ready (:class:`NetPool`): a spawn
takes one, hands its descriptor to the zygote, whose forked child enters it
(``setns``), and a refill makes the next one in the background. An empty pool makes
one on the spot.

slirp4netns runs as long as the instance: its ``--exit-fd`` is the read end of a pipe
whose only write end goes to the instance's init, so it exits when the instance has.
An idle namespace of the pool costs a slirp4netns process (about 0.4 MB of PSS here).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.logs import get_logger
from services.deployer.backends.refill import Refilling
from services.deployer.children import Children

log = get_logger(__name__)

CLONE_NEWNET = 0x40000000
POOL_SIZE = 2  # ready namespaces: a burst of wake-ups past this makes the rest on the spot
READY_TIMEOUT_S = 10.0  # slirp4netns started and its interface up; about 10 ms here
# the user-mode network (slirp4netns): outside every private range, so it never shadows a real
# network of the host's; its DNS forwarder is the .3
CIDR = "100.64.255.0/24"
DNS = "100.64.255.3"
MTU = 65520
RESOLV_CONF = f"nameserver {DNS}\n"

_libc = ctypes.CDLL(None, use_errno=True)


class NetUnavailable(OSError):
    """A network namespace or its slirp4netns could not be set up."""


@dataclass
class Net:
    """A ready namespace: its descriptor and the exit pipe's write end, both for the instance; its slirp4netns."""

    netns_fd: int
    exit_w: int
    proc: asyncio.subprocess.Process

    def handed_over(self) -> None:
        """The zygote has its copies: ours go (the namespace and slirp4netns now live as long as the instance)."""
        for fd in (self.netns_fd, self.exit_w):
            os.close(fd)

    def discard(self) -> None:
        self.handed_over()
        if self.proc.returncode is None:
            self.proc.kill()


def _new_netns() -> int:
    """A descriptor of a fresh network namespace; made in a thread of its own, which alone enters it."""
    result: list[int | BaseException] = []

    def make() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetUnavailable(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            result.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:
            result.append(exc)
        # the thread ends here: no other code ever runs in the namespace it moved to

    thread = threading.Thread(target=make, name="netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class NetPool(Refilling):
    def __init__(self, children: Children, log_path: Path, size: int = POOL_SIZE) -> None:
        super().__init__(size)
        self.children = children
        self.log_path = log_path  # slirp4netns's own messages, of every instance
        self.ready: list[Net] = []

    async def take(self) -> Net:
        """A ready namespace (from the pool, else made now); raises NetUnavailable."""
        net = self.ready.pop(0) if self.ready else None
        self.refill_soon()
        return net if net is not None else await self.make()

    async def make(self) -> Net:
        netns_fd = await asyncio.to_thread(_new_netns)
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        argv = ["slirp4netns", "--configure", f"--mtu={MTU}", f"--cidr={CIDR}", "--disable-host-loopback",
                "--enable-sandbox", "--enable-seccomp", "--netns-type=path", "--ready-fd", str(ready_w),
                "--exit-fd", str(exit_r), f"/proc/self/fd/{netns_fd}", "tap0"]
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as out:
                proc = await self.children.exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                                                pass_fds=(netns_fd, ready_w, exit_r), start_new_session=True)
        except OSError as exc:
            for fd in (netns_fd, ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise NetUnavailable(exc.errno, f"could not start slirp4netns: {exc}") from None
        finally:
            for fd in (ready_w, exit_r):  # slirp4netns has its own
                try:
                    os.close(fd)
                except OSError:
                    pass
        net = Net(netns_fd, exit_w, proc)
        try:
            if not await _read_byte(ready_r, READY_TIMEOUT_S):
                raise NetUnavailable(0, f"slirp4netns did not come up (see {self.log_path})")
        except BaseException:
            net.discard()
            raise
        finally:
            os.close(ready_r)
        return net

    async def _fill_missing(self) -> None:
        while not self._closed and len(self.ready) < self.size and not self.backoff.blocked:
            try:
                net = await self.make()
            except NetUnavailable as exc:
                log.warning("could not prepare a network namespace", error=str(exc),
                            retry_in_s=self.backoff.failed())
                return
            self.backoff.succeeded()
            if self._closed:
                net.discard()
                return
            self.ready.append(net)

    def close(self) -> None:
        self._closed = True
        self.cancel_refill()
        for net in self.ready:
            net.discard()
        self.ready.clear()


async def _read_byte(fd: int, timeout_s: float) -> bool:
    """True once ``fd`` yields a byte; False at EOF or after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait_for(readable, timeout_s)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return bool(os.read(fd, 1))
