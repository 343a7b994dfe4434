"""One start/stop sequence for every asyncio service: signals, graceful stop, exit code."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from typing import Awaitable, Callable

from shared.logs import get_logger

log = get_logger(__name__)


def install_event_loop() -> str:
    """Use uvloop when it can run without io_uring (see :func:`shared.seccomp.deny_io_uring`), else asyncio's loop.

    Returns the loop's name. asyncio's own loop works the same, only slower; it is
    used when uvloop is missing or io_uring cannot be turned off for this process.
    """
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    try:
        from shared.seccomp import deny_io_uring

        deny_io_uring()
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        log.warning("using asyncio's event loop: uvloop needs io_uring turned off, which failed", error=str(exc))
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def settle_gc() -> None:
    """Call once a service has started: its startup objects leave the collector's view.

    A service's hot path frees what it allocates by reference counting; what the
    cyclic collector costs is full collections walking every object the imports and
    the app built at start (FastAPI's models, the routing tables): tens of ms each,
    which showed as the tail of the invoke latency (p99 at 64 connections 42 -> 11 ms).
    Frozen, they are never walked again. The thresholds stay the default: a 10x larger
    young generation measured ~10 % more CPU per request.
    """
    gc.collect()
    gc.freeze()


def run(main: Callable[[asyncio.Event], Awaitable[int | None]], name: str) -> int:
    """Run ``main(stop)`` until it returns; SIGTERM/SIGINT set ``stop``.

    ``main`` should stop taking work when ``stop`` is set, finish in-flight work
    up to its own timeout, close its sockets and return. An exception escaping it
    is fatal: logged, and the process exits 1 so a supervisor restarts it.
    """
    install_event_loop()

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        code = await main(stop)
        return int(code or 0)

    try:
        return asyncio.run(runner())
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("fatal error, exiting", service=name)
        return 1


def exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
