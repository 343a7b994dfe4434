"""The instance config: what every backend builds and every instance program reads back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.instanceconfig import InstanceConfig, InvalidInstanceConfig

FULL = {
    "instance_id": "g-v3-abc", "group": "g", "group_version": 3, "gateways": ["tcp://127.0.0.1:5560"],
    "functions": [{"name": "f", "version": 2, "code_dir": "/code", "handler": "main:handler", "env": {"A": "1"}}],
    "link": True, "host": "node-1", "link_dir": "/run/nuclide-link", "gateway_url": "http://127.0.0.1:8000",
    "fusionizer_host": "127.0.0.2", "memory_bytes": 128 * 1024 * 1024,
}


def test_round_trips_as_a_map_and_as_json() -> None:
    config = InstanceConfig.from_dict(FULL)
    assert config.to_dict() == FULL
    assert InstanceConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json()) == FULL


def test_optional_fields_default_and_unknown_keys_are_ignored() -> None:
    config = InstanceConfig.from_dict({"instance_id": "i", "group": "g", "group_version": "1", "gateways": [],
                                       "docker_host": "unix:///var/run/docker.sock", "warm_start": "none"})
    assert config == InstanceConfig("i", "g", 1, ())
    assert (config.fusionizer_host, config.memory_bytes, config.link) == ("127.0.0.1", 0, False)


@pytest.mark.parametrize("change,needle", [
    ({"instance_id": None}, "has no 'instance_id'"),
    ({"gateways": None}, "has no 'gateways'"),
    ({"gateways": "tcp://127.0.0.1:1"}, "'gateways' must be a list of endpoint strings"),
    ({"gateways": [5560]}, "'gateways' must be a list of endpoint strings"),
    ({"functions": {"name": "f"}}, "'functions' must be a list of maps"),
    ({"group_version": "three"}, "'group_version' and 'memory_bytes' must be integers"),
    ({"memory_bytes": [1]}, "'group_version' and 'memory_bytes' must be integers"),
])
def test_a_bad_config_names_the_field(change: dict[str, Any], needle: str) -> None:
    data = {k: v for k, v in {**FULL, **change}.items() if v is not None}
    with pytest.raises(InvalidInstanceConfig, match=needle):
        InstanceConfig.from_dict(data)


def test_not_a_map_or_not_json() -> None:
    with pytest.raises(InvalidInstanceConfig, match="must be a map, got list"):
        InstanceConfig.from_dict([])
    with pytest.raises(InvalidInstanceConfig, match="not valid JSON"):
        InstanceConfig.from_json("{")
