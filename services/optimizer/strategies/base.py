"""The strategy interface: a long-running coroutine that may change the fusion setup."""

from __future__ import annotations

import abc
from collections import deque
from typing import Any, Protocol

from shared.config import Settings


class Optimizer(Protocol):
    """What a strategy uses of the optimizer service: the traces it keeps, the setup in force, and
    ``apply``/``decide`` to change and explain it."""

    edges: deque[tuple[float, Any, str, bool, bool, float, int]]
    calls: deque[tuple[float, str, float, int]]
    status: dict[str, Any]

    async def current_setup(self) -> list[list[str]]: ...

    async def apply(self, setup: list[list[str]]) -> None: ...

    def decide(self, setup: list[list[str]], decision: str, reason: str, **evidence: Any) -> None: ...


class Strategy(abc.ABC):
    name = "abstract"

    def __init__(self, settings: Settings) -> None:
        """Validate configuration here: a strategy that cannot run must refuse to start."""
        self.settings = settings

    @abc.abstractmethod
    async def run(self, opt: Optimizer) -> None:
        """Decide setups and apply them with ``opt.apply``; record decisions with ``opt.decide``."""
