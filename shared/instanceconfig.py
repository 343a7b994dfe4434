"""What an instance is told at start: who it is, which gateways to reach, the functions it serves.

The deployer's backends build one :class:`InstanceConfig` per instance and hand it over as a map
(a JSON file or environment value, a msgpack map in a pool or zygote frame); the instance programs
(``services.runtime``, its per-call ``once`` and the Docker backend's runner) read it back with
:meth:`InstanceConfig.from_dict`. Fields are only ever added, with defaults; keys a reader does not
know are ignored, so a runner's config can carry its own settings next to these. Each entry of
``functions`` is a function's settings as the deployer resolved them (``name``, ``version``,
``code_dir``, ``handler``, ``env``, ``timeout_s``, ``max_concurrency``, ...).

Imports nothing heavy: a per-call process reads it before it knows its function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


CONFIG_ENV = "NUCLIDE_INSTANCE_CONFIG_JSON"  # the config as JSON in a container's environment


class InvalidInstanceConfig(ValueError):
    """An instance config that cannot be served (a deployer fault: the instance exits and says why)."""


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    instance_id: str
    group: str
    group_version: int
    gateways: tuple[str, ...]  # ROUTER endpoints of the gateways known at start (HEARTBEATs name the others)
    functions: tuple[dict[str, Any], ...] = ()
    link: bool = False  # sandboxed without a route to the host: gateways of this machine by their link sockets
    host: str = ""  # the machine's name, to tell this machine's gateways from others'
    link_dir: str = ""  # where a container sees the gateways' link directory ("" where it is the host's)
    gateway_url: str = ""  # the HTTP API, for handlers calling functions over HTTP
    fusionizer_host: str = "127.0.0.1"  # the host a Fusionizer-style requests session addresses
    memory_bytes: int = 0  # the instance's memory limit, 0 for none

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gateways"] = list(self.gateways)
        data["functions"] = [dict(f) for f in self.functions]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInstanceConfig(f"instance config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> InstanceConfig:
        """The config a map describes; :class:`InvalidInstanceConfig` names the first field that is wrong."""
        if not isinstance(data, dict):
            raise InvalidInstanceConfig(f"instance config must be a map, got {type(data).__name__}")
        for key in ("instance_id", "group", "group_version", "gateways"):
            if key not in data:
                raise InvalidInstanceConfig(f"instance config has no '{key}'; the deployer must set it")
        gateways = data["gateways"]
        if not isinstance(gateways, (list, tuple)) or not all(isinstance(g, str) for g in gateways):
            raise InvalidInstanceConfig("instance config: 'gateways' must be a list of endpoint strings")
        functions = data.get("functions") or ()
        if not isinstance(functions, (list, tuple)) or not all(isinstance(f, dict) for f in functions):
            raise InvalidInstanceConfig("instance config: 'functions' must be a list of maps")
        try:
            group_version = int(data["group_version"])
            memory_bytes = int(data.get("memory_bytes") or 0)
        except (TypeError, ValueError):
            raise InvalidInstanceConfig("instance config: 'group_version' and 'memory_bytes' must be integers") \
                from None
        return cls(
            instance_id=str(data["instance_id"]), group=str(data["group"]), group_version=group_version,
            gateways=tuple(gateways), functions=tuple(functions), link=bool(data.get("link")),
            host=str(data.get("host") or ""), link_dir=str(data.get("link_dir") or ""),
            gateway_url=str(data.get("gateway_url") or ""),
            fusionizer_host=str(data.get("fusionizer_host") or "127.0.0.1"), memory_bytes=memory_bytes,
        )

