"""The `static` strategy: apply setups at fixed times after start, from a schedule file.

The file is the Nuclio Fusionizer's format, JSON ``{"40": [["taska", "taskb"]]}``
(seconds after start -> setup), or the same mapping in YAML. A file that does not
parse refuses to start, naming the line and the reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shared.config import ConfigError, Settings
from shared.errors import NuclideError
from services.optimizer.strategies.base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from services.optimizer.strategies.base import Optimizer


def load_schedule(path: str) -> list[tuple[float, list[list[str]]]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"schedule file {path}: cannot read it: {exc.strerror}") from None
    try:
        if path.endswith(".json") or text.lstrip().startswith("{"):
            doc: Any = json.loads(text)
        else:
            doc = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"schedule file {path} line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"schedule file {path}{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f'schedule file {path}: expected a mapping of seconds to setups, e.g. {{"40": [["a", "b"]]}}')
    entries = []
    for key, setup in doc.items():
        try:
            at_s = float(key)
        except (TypeError, ValueError):
            raise ConfigError(f"schedule file {path}: key {key!r} is not a number of seconds") from None
        if at_s < 0:
            raise ConfigError(f"schedule file {path}: key {key!r} is negative")
        if (not isinstance(setup, list) or not setup
                or not all(isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in setup)):
            raise ConfigError(f"schedule file {path}: the setup at {key!r} must be a list of non-empty lists of task names")
        entries.append((at_s, setup))
    return sorted(entries, key=lambda e: e[0])


class StaticStrategy(Strategy):
    name = "static"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.schedule = load_schedule(settings.optimizer_schedule)

    async def run(self, opt: "Optimizer") -> None:
        started = time.monotonic()
        opt.status["schedule"] = [{"at_s": at, "setup": setup} for at, setup in self.schedule]
        for at_s, setup in self.schedule:
            opt.status["state"] = f"waiting for t={at_s:g} s"
            await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
            try:
                await opt.apply(setup)
                opt.decide(setup, "applied", f"scheduled at t={at_s:g} s")
            except NuclideError as exc:
                opt.decide(setup, "refused", f"scheduled at t={at_s:g} s: {exc.message}")
        opt.status["state"] = "schedule done"
