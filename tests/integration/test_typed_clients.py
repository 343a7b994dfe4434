"""The typed clients against real store and deployer processes: every method's arguments are the ones the server
reads, and every change the store makes is published, numbered without a gap."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from services.deployer.rpc import METHODS as DEPLOYER_METHODS
from services.store.server import METHODS
from shared import protocol
from shared.aiosock import RpcClient, sync_call
from shared.deployerclient import DeployerClient
from shared.errors import Conflict, InvalidRequest, NuclideError
from shared.storeclient import StoreClient
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.timeout(120)

SPEC = {"handler": "main:handler", "runtime": "python:3.11", "min_replicas": 1}
OWNER = "boot-test"


class Sent(RpcClient):
    """The real RPC client, noting the methods it sent."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.methods: set[str] = set()

    async def call_with_bodies(self, method: str, args: dict[str, Any] | None = None, *bodies: bytes,
                               **kw: Any) -> tuple[Any, tuple[bytes, ...]]:
        self.methods.add(method)
        return await super().call_with_bodies(method, args, *bodies, **kw)


@pytest.fixture
def store_only(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "var")
    s.start_service("store")
    wait_for(lambda: sync_call(s.endpoints["store_rpc"], "ping", timeout_s=1.0, keys=s.keys()), 30, what="the store answering")
    try:
        yield s
    finally:
        s.stop()


async def tour(store: StoreClient) -> dict[str, Any]:
    """Every store method once, in an order that gives each something to act on; returns what a test checks."""
    seen: dict[str, Any] = {}
    seen["ping"] = await store.ping()
    seen["health"] = await store.health()
    await store.deployer_report(0)
    await store.deployer_report(0, {}, 2.0)
    await store.metrics_report("optimizer", {}, 1.0)
    seen["metrics"] = await store.metrics_get()
    await store.kv_put("k", {"a": [1, 2]})
    seen["kv"] = await store.kv_get("k")
    assert await store.runtime_list() == []
    await store.runtime_put({"name": "rt", "image": "img:1", "path": "/ws", "dependencies": [], "run": ["rt"]}, "sha")
    seen["runtime"] = await store.runtime_get("rt")
    await store.runtime_delete("rt")

    put = await store.function_put("f", SPEC, ["w"], b"zip of f")
    seen["put"] = put
    group_id, group_version = put["group_id"], put["group_version"]
    digest = (await store.version_get("f", 1))["digest"]
    seen["blob"] = await store.blob_get(digest)
    await store.group_spec(group_id)
    await store.instance_started("i1", group_id, group_version, "process", 4242)
    await store.instance_ready("i1", group_id, group_version, {"f": 1})
    seen["instances"] = await store.instances_list(group_id)
    seen["function"] = await store.function_get("f")
    assert [fn["name"] for fn in await store.function_list()] == ["f"]
    await store.function_replicas("f", 1)
    await store.function_replicas("f", None)
    await store.group_scale(group_id, 1, "a test")
    await store.function_put("g", SPEC, [], b"zip of g")
    regroup = (await store.groups_set([["f", "g"]]))["regroup"]
    seen["regroup"] = await store.regroup_get(regroup["id"])
    proposed = seen["regroup"]["groups"][0]
    await store.deploy_failed(proposed["id"], proposed["version"], "it broke", "the last lines", ["g"])
    seen["groups"] = await store.groups_list()
    await store.instance_exited("i1", 0)
    await store.instances_gone(["i-never-reported"], "gone")
    seen["announce"] = await store.gateway_announce({"id": "gw-a", "pub": "tcp://127.0.0.1:1"})
    seen["gateways"] = await store.gateways_list()
    await store.gateway_bye("gw-a")

    [submitted] = await store.calls_submit([{"id": "c1", "function": "f", "owner": OWNER,
                                             "callback_url": "http://127.0.0.1:9/cb"}], [b"payload"])
    seen["submitted"] = submitted
    seen["owned"] = await store.calls_owned(OWNER, ["c1", "c-other"])
    seen["changed"] = await store.calls_update([{"id": "c1", "status": "DONE", "has_result": True, "if_owner": OWNER,
                                                 "result_status": 200, "finished_at": time.time()}], [b"the result"])
    seen["result"] = await store.calls_result("c1")
    seen["pending"] = await store.calls_pending_callbacks(OWNER, 10)
    seen["taken"] = await store.calls_take_callback("c1", OWNER)
    seen["call"] = await store.calls_get("c1")
    await store.calls_record_sync([["s1", "f", "DONE", 1.0, 1.5, 200, None, False]])
    seen["listed"] = await store.calls_list("f", None, 10)
    seen["trace"] = await store.calls_trace("0" * 31 + "1")
    seen["claimed"] = await store.calls_claim("boot-other", 10)
    try:
        await store.calls_redrive("c1")
    except Conflict as exc:  # only a DEAD call is redriven: the store read the id and looked the call up
        seen["redrive"] = exc
    seen["counts"] = await store.calls_counts()
    seen["purged"] = await store.calls_purge("DONE", "f")

    seen["snapshot"] = await store.snapshot()
    await store.function_delete("g")
    seen["last_seq"] = (await store.ping())["seq"]
    return seen


def test_every_method_of_the_typed_client_is_served_by_a_real_store(store_only: Stack) -> None:
    ctx = zmq.Context()
    sub = store_only.keys().client(ctx.socket(zmq.SUB), "store")  # the store publishes to services only
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(store_only.endpoints["store_pub"])

    async def run() -> dict[str, Any]:
        rpc = Sent(ctx, store_only.endpoints["store_rpc"], "store", store_only.keys())
        store = StoreClient(rpc)
        try:
            # a subscription takes effect a moment after connecting: announce until its event arrives
            probe = 0
            while not sub.poll(50):
                probe += 1
                await store.gateway_announce({"id": "gw-probe", "round": str(probe)})
            seen = await tour(store)
            seen["sent"] = rpc.methods
            return seen
        finally:
            store.close()

    try:
        seen = asyncio.run(asyncio.wait_for(run(), 90))
        events: list[tuple[int, str]] = []

        def all_published() -> bool:
            while sub.poll(0):
                _, msg = protocol.decode_published(sub.recv_multipart())
                events.append((msg.header["seq"], msg.header["kind"]))
            return bool(events) and events[-1][0] >= seen["last_seq"]

        wait_for(all_published, 30, what="every event of the tour")
    except NuclideError as exc:
        pytest.fail(f"the store refused what the typed client sent: {exc}")
    finally:
        sub.close()
        ctx.term()

    assert seen["sent"] == set(METHODS)  # the tour reached every method the store serves
    assert seen["kv"] == {"a": [1, 2]}
    assert {name: m["interval_s"] for name, m in seen["metrics"]["services"].items()} == {"deployer": 2.0,
                                                                                          "optimizer": 1.0}
    assert seen["runtime"]["image"] == "img:1" and seen["runtime"]["image_id"] == "sha"
    assert seen["blob"] == b"zip of f"
    assert [i["id"] for i in seen["instances"]] == ["i1"] and seen["function"]["state"] == "ready"
    assert seen["regroup"]["setup"] == [["f", "g"]]
    assert seen["groups"]["regroup"]["state"] == "failed" and seen["groups"]["regroup"]["failed_tasks"] == ["g"]
    assert "gw-a" in {g["id"] for g in seen["announce"]["gateways"]} and "gw-a" in {g["id"] for g in seen["gateways"]}
    assert seen["submitted"]["duplicate"] is False and seen["owned"] == ["c1"] and seen["changed"] == {"changed": 1}
    assert seen["result"] == (seen["result"][0], b"the result") and seen["result"][0]["status"] == "DONE"
    assert [p["id"] for p in seen["pending"][0]] == ["c1"] and seen["pending"][1] == (b"the result",)
    assert seen["taken"] == {"taken": True} and seen["call"]["callback"]["state"] == "sending"
    assert {c["id"] for c in seen["listed"]} == {"c1", "s1"}
    assert seen["trace"] == {"trace_id": "0" * 31 + "1", "calls": [], "truncated": False}
    assert seen["claimed"] == ([], ())
    assert isinstance(seen.get("redrive"), Conflict)
    assert seen["counts"]["DONE"] == 2 and seen["purged"] == {"purged": 2}
    # each change was published once, numbered without a gap, up to the number ping reports
    seqs = [seq for seq, _ in events]
    assert seqs == list(range(seqs[0], seen["last_seq"] + 1))
    kinds = {kind for _, kind in events}
    assert {"runtime.changed", "runtime.deleted", "function.changed", "group.changed", "instance.changed",
            "regroup.changed", "deploy.failed", "gateway.changed", "gateway.gone", "function.deleted"} <= kinds, kinds


def test_every_method_of_the_typed_deployer_client_is_served_by_a_real_deployer(store_only: Stack) -> None:
    store_only.start_service("deployer")
    ctx = zmq.Context()

    async def run() -> dict[str, Any]:
        rpc = Sent(ctx, store_only.endpoints["deployer_rpc"], "deployer", store_only.keys())
        deployer = DeployerClient(rpc)
        seen: dict[str, Any] = {}
        try:
            while "ping" not in seen:
                try:
                    seen["ping"] = await deployer.ping(timeout_s=1.0)
                except NuclideError:  # still starting
                    pass
            seen["instances"] = await deployer.instances()
            seen["replace"] = await deployer.instance_replace("i-not-here")
            seen["python"] = await deployer.python_check("3.0")
            seen["warm"] = await deployer.warm_start_check("function")
            try:
                await deployer.warm_start_check("none")
            except InvalidRequest as exc:  # the process backend runs no container per call: said, with the fix
                seen["warm_refused"] = exc.message
            try:
                await deployer.runtime_check("img:1")
            except InvalidRequest as exc:
                seen["runtime_refused"] = exc.message
            seen["logs"] = await deployer.logs("nothing-deployed", 10, None, None)
            seen["sent"] = rpc.methods
            return seen
        finally:
            deployer.close()

    try:
        seen = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        ctx.term()
    assert seen["sent"] == set(DEPLOYER_METHODS)
    assert seen["ping"] == {"ok": True, "instances": 0} and seen["instances"] == []
    assert seen["replace"] == {"replaced": False}
    assert seen["python"]["available"] is False and seen["python"]["detail"]
    assert seen["warm"] == {"ok": True} and "NUCLIDE_BACKEND=docker" in seen["warm_refused"]
    assert "NUCLIDE_BACKEND=docker" in seen["runtime_refused"]
    assert seen["logs"] == {"text": "", "cursor": {}}
