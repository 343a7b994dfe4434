"""One start/stop sequence for every asyncio service: signals, graceful stop, exit code."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Awaitable, Callable

from shared.logs import get_logger

log = get_logger(__name__)


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # uvloop is optional; asyncio's loop works, only slower
        pass


def run(main: Callable[[asyncio.Event], Awaitable[int | None]], name: str) -> int:
    """Run ``main(stop)`` until it returns; SIGTERM/SIGINT set ``stop``.

    ``main`` should stop taking work when ``stop`` is set, finish in-flight work
    up to its own timeout, close its sockets and return. An exception escaping it
    is fatal: logged, and the process exits 1 so a supervisor restarts it.
    """
    install_uvloop()

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
