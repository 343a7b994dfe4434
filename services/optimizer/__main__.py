"""Entry point: python -m services.optimizer [--check]."""

from __future__ import annotations

import asyncio
import sys

import zmq

from shared.aiosock import sync_call
from shared.config import ConfigError, Settings
from shared.curve import Keys
from shared.entry import main


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    from services.optimizer.service import Optimizer
    from services.optimizer.strategies import STRATEGIES

    try:
        strategy = STRATEGIES[settings.optimizer_strategy](settings)
    except ConfigError as exc:
        print(f"nuclide optimizer: {exc}", file=sys.stderr)
        return 2
    await Optimizer(settings, ctx, strategy).serve(stop)
    return 0


def check(settings: Settings) -> str:
    status = sync_call(settings.store_rpc, "kv.get", {"key": "optimizer"}, keys=Keys.load(settings, "optimizer"))
    if not status:
        raise RuntimeError("the optimizer has not reported to the store")
    return f"optimizer ok, strategy {status['strategy']}, state {status['state']}"


if __name__ == "__main__":
    main("optimizer", serve, check)
