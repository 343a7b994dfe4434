"""The strategy interface: a long-running coroutine that may change the fusion setup."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from shared.config import Settings

if TYPE_CHECKING:  # pragma: no cover
    from services.optimizer.service import Optimizer


class Strategy(abc.ABC):
    name = "abstract"

    def __init__(self, settings: Settings) -> None:
        """Validate configuration here: a strategy that cannot run must refuse to start."""
        self.settings = settings

    @abc.abstractmethod
    async def run(self, opt: "Optimizer") -> None:
        """Decide setups and apply them with ``opt.apply``; record decisions with ``opt.decide``."""
