"""Fusion strategies: each module defines one Strategy subclass; STRATEGIES maps names to them."""

from __future__ import annotations

from services.optimizer.strategies.base import Strategy
from services.optimizer.strategies.feedback import FeedbackStrategy
from services.optimizer.strategies.none import NoneStrategy
from services.optimizer.strategies.static import StaticStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (NoneStrategy, StaticStrategy, FeedbackStrategy)
}
