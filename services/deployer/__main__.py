"""Entry point: python -m services.deployer [--check]."""

from __future__ import annotations

import asyncio

import zmq

from shared.aiosock import sync_call
from shared.config import Settings
from shared.entry import main


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    from shared.aiosock import AsyncRpcServer, RpcClient
    from shared.config import ConfigError
    from shared.errors import NuclideError
    from shared.liveness import DEPLOYER_REPORT_INTERVAL_S
    from shared.logs import get_logger
    from shared.statefeed import StateFeed
    from shared.service import settle_gc
    from shared.storeclient import StoreClient
    from services.deployer.backends.base import Backend
    from services.deployer.backends.process import ProcessBackend
    from services.deployer.builder import Builder
    from services.deployer.children import Children
    from services.deployer.reconciler import Reconciler
    from services.deployer.rpc import DeployerRpc

    log = get_logger("deployer")
    store = StoreClient(RpcClient(ctx, settings.store_rpc, "store"))
    children = Children()  # every child process of the deployer, and a sweep that reaps orphans
    backend: Backend
    if settings.backend in ("docker", "swarm"):  # both build the group's image on the engine
        from services.deployer.backends.docker.backend import DockerBackend
        from services.deployer.backends.docker.images import DockerBuilder
        from services.deployer.backends.swarm.backend import SwarmBackend

        reconciler = Reconciler(settings, store, DockerBuilder(settings, store))
        engine_backend: DockerBackend | SwarmBackend
        if settings.backend == "docker":
            engine_backend = DockerBackend(settings, reconciler.on_exit)
        else:
            engine_backend = SwarmBackend(settings, reconciler.on_exit)
        # the versions whose images stay cached: none known before the first sync, none at all when closing
        engine_backend.wanted_versions = lambda: (
            None if not reconciler.synced else {} if reconciler.closing
            else {g["id"]: int(g["version"]) for g in reconciler.groups.values()})
        backend = engine_backend
    else:
        reconciler = Reconciler(settings, store, Builder(settings, store, children))
        backend = ProcessBackend(settings, reconciler.on_exit, children)
    reconciler.backend = backend
    try:
        adopted = backend.adopt()
    except ConfigError as exc:  # the platform cannot run this backend (a swarm backend on no swarm): say the fix
        log.error(f"the {backend.name} backend cannot run here: {exc}")
        store.close()
        return 2  # as a setting that cannot be used: a supervisor restarting it would not help
    if adopted:
        log.info("adopted running instances", count=len(adopted))

    rpc = AsyncRpcServer(ctx, settings.deployer_rpc, DeployerRpc(settings, backend, reconciler).handle, name="deployer")
    feed = StateFeed(ctx, settings.store_pub, store.rpc, reconciler.on_snapshot, reconciler.on_event)
    feed.start()

    async def report() -> None:
        while True:
            try:
                await store.deployer_report(len(backend.list()), reconciler.metrics.snapshot(backend),
                                            DEPLOYER_REPORT_INTERVAL_S, timeout_s=2.0)
            except NuclideError:
                pass
            await asyncio.sleep(DEPLOYER_REPORT_INTERVAL_S)

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            reconciler.kick()

    tasks = [asyncio.ensure_future(report()), asyncio.ensure_future(tick()), asyncio.ensure_future(children.run())]
    settle_gc()
    log.info("deployer ready", backend=backend.name, rpc=settings.deployer_rpc)
    await stop.wait()
    log.info("deployer stopping", stop_instances=settings.stop_instances_on_exit)
    for task in tasks:
        task.cancel()
    feed.close()  # no more events: nothing reacts to the stops below by starting instances
    reconciler.close()
    if settings.stop_instances_on_exit:
        await reconciler.stop_all()
    close = getattr(backend, "close", None)
    if close is not None:
        close()
    rpc.close()
    store.close()
    return 0


def check(settings: Settings) -> str:
    result = sync_call(settings.deployer_rpc, "ping")
    return f"deployer ok, {result['instances']} instances"


if __name__ == "__main__":
    main("deployer", serve, check)
