"""The `none` strategy: the optimizer leaves the fusion setup alone."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.optimizer.strategies.base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from services.optimizer.strategies.base import Optimizer


class NoneStrategy(Strategy):
    name = "none"

    async def run(self, opt: "Optimizer") -> None:
        opt.status["state"] = "idle"
        await asyncio.Event().wait()
