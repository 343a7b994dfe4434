"""The typed RPC clients and the servers' dispatch tables name the same methods, each under one name on both sides."""

from __future__ import annotations

import asyncio
import inspect
import types
import typing
from typing import Any

import pytest

from services.deployer.rpc import METHODS as DEPLOYER_METHODS
from services.store.server import METHODS as STORE_METHODS
from shared.deployerclient import DeployerClient
from shared.storeclient import StoreClient

CLIENTS = [(StoreClient, STORE_METHODS), (DeployerClient, DEPLOYER_METHODS)]


class Recorder:
    """Stands in for the RpcClient under a typed client: records the method each call sends and its arguments."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], tuple[bytes, ...]]] = []

    async def call_with_bodies(self, method: str, args: dict[str, Any] | None = None, *bodies: bytes,
                               timeout_s: float = 1.0) -> tuple[Any, tuple[bytes, ...]]:
        self.sent.append((method, args or {}, bodies))
        return {}, (b"",)

    async def call(self, method: str, args: dict[str, Any] | None = None, *bodies: bytes, timeout_s: float = 1.0) -> Any:
        return (await self.call_with_bodies(method, args, *bodies, timeout_s=timeout_s))[0]

    def close(self) -> None:
        pass


def placeholder(annotation: Any) -> Any:
    """A value of the annotated type, for a required parameter."""
    origin = typing.get_origin(annotation) or annotation
    if origin in (typing.Union, types.UnionType):  # X | None: an X
        return placeholder(typing.get_args(annotation)[0])
    return {str: "x", int: 1, float: 1.0, bytes: b"", list: [], dict: {}}.get(origin)


def rpc_methods(client_class: type) -> dict[str, Any]:
    """The client's methods that make a request: its public coroutine functions."""
    return {name: fn for name, fn in inspect.getmembers(client_class, inspect.iscoroutinefunction)
            if not name.startswith("_")}


def sent_by(client_class: type, name: str) -> tuple[str, dict[str, Any], tuple[bytes, ...]]:
    """What calling the client's method ``name`` sends, its required parameters given placeholder values."""
    recorder = Recorder()
    client = client_class(recorder)
    method = getattr(client, name)
    hints = typing.get_type_hints(getattr(client_class, name))
    args = {p.name: placeholder(hints[p.name]) for p in inspect.signature(method).parameters.values()
            if p.default is inspect.Parameter.empty}
    asyncio.run(method(**args))
    [sent] = recorder.sent
    return sent


@pytest.mark.parametrize("client_class, table", CLIENTS, ids=["store", "deployer"])
def test_every_client_method_sends_a_method_of_the_servers_table_named_like_it(client_class: type,
                                                                                 table: dict[str, Any]) -> None:
    for name in rpc_methods(client_class):
        method, _, _ = sent_by(client_class, name)
        assert method in table, f"{client_class.__name__}.{name} sends {method!r}, which the server does not serve"
        assert name == method.replace(".", "_"), f"{client_class.__name__}.{name} sends {method!r}: name it after it"


@pytest.mark.parametrize("client_class, table", CLIENTS, ids=["store", "deployer"])
def test_every_method_of_the_servers_table_has_a_client_method(client_class: type, table: dict[str, Any]) -> None:
    sent = {sent_by(client_class, name)[0] for name in rpc_methods(client_class)}
    assert sorted(set(table) - sent) == [], f"served, but {client_class.__name__} has no method for them"


def test_the_zip_of_a_new_version_travels_as_a_raw_frame() -> None:
    recorder = Recorder()
    asyncio.run(StoreClient(recorder).function_put("fn", {"handler": "main:handler"}, [], b"PK\x03\x04zip"))
    assert recorder.sent == [("function.put", {"name": "fn", "spec": {"handler": "main:handler"}, "warnings": []},
                              (b"PK\x03\x04zip",))]
