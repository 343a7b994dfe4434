"""Several gateways: how a gateway describes itself in the store, and which of its endpoints a peer connects to.

Every gateway announces itself to the store every GATEWAY_BEAT_S (``gateway.announce``); the store
publishes ``gateway.changed`` when one appears and ``gateway.gone`` when one says BYE or stops beating
for GATEWAY_TTL_S, and lists the live ones in its snapshot. Instances connect out to every gateway: the
deployer starts them with the gateways it knows, and every gateway lists the live ones in its HEARTBEATs
to its instances, so a gateway started later is reached without restarting anything. A record:

    {"id": boot id, "name": gateway_name, "host": machine name, "router": tcp:// ROUTER as others reach it,
     "link": ipc:// instance link on its own machine, "pub": tcp:// PUB of call traces, "http": base URL}

An async call is owned by the boot id of the gateway running it; the store hands a call to another
gateway only once its owner is no longer live (services/store/durable_calls.py).
"""

from __future__ import annotations

import socket
from typing import Any

from shared.liveness import HEARTBEAT_LIVENESS

GATEWAY_BEAT_S = 1.0  # how often a gateway announces itself to the store; sane range 0.2-5 s
# a gateway silent this long is gone: its async calls go to the others (a kill -9 costs this long a delay)
GATEWAY_TTL_S = GATEWAY_BEAT_S * HEARTBEAT_LIVENESS
RECORD_FIELDS = ("id", "name", "host", "router", "link", "pub", "http")


def this_host() -> str:
    """The machine's name, which tells a gateway's link socket (usable on its own machine only) apart."""
    return socket.gethostname()


def gateway_record(settings: Any, boot_id: str) -> dict[str, str]:
    """What a gateway announces about itself (``settings``: its shared.config.Settings)."""
    return {
        "id": boot_id, "name": settings.gateway_name, "host": this_host(),
        "router": settings.router_advertised,
        "link": settings.instance_link if settings.backend in ("process", "docker") else "",
        "pub": settings.pub_advertised,
        "http": f"http://{settings.advertised_host}:{settings.http_port}",
    }


def endpoint_for(record: dict[str, Any], link: bool, host: str, link_dir: str = "") -> str:
    """The endpoint an instance connects to for one gateway: its link socket for a sandboxed instance on the
    gateway's machine (no route to the host's network there), else its advertised ROUTER. ``link_dir``: where
    the instance sees the host's link directory (a container binds it elsewhere), empty when at the same path."""
    if link and record.get("link") and record.get("host") == host:
        path = str(record["link"])
        return f"ipc://{link_dir}/{path.rsplit('/', 1)[-1]}" if link_dir else path
    return str(record.get("router") or "")


def instance_endpoints(records: list[dict[str, Any]], link: bool, host: str, fallback: str,
                       link_dir: str = "") -> list[str]:
    """Every known gateway's endpoint for a new instance (``fallback``, the deployer's own setting, when none
    is known yet); sorted, so a config is the same for the same gateways."""
    found = sorted({e for e in (endpoint_for(r, link, host, link_dir) for r in records) if e})
    return found or [fallback]
