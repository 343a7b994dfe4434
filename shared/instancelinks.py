"""An instance's links to the gateways: one DEALER per gateway, so each gateway gets its own READY,
HEARTBEATs and the RESULTs of the calls it sent (a single DEALER connected to several gateways would
round-robin them).

Every instance-side socket to a gateway is made here (:meth:`InstanceLinks.open`), for the runtime's loop
and the Docker runner alike. The links start from the instance config's ``gateways``; a gateway's
HEARTBEAT names the live gateways (shared/gateways.py), and :meth:`InstanceLinks.learn` opens a link to
each new one, so a gateway started after the instance is reached without a restart. Every link is a CURVE
client with the keypair the deployer issued for this instance (its config's ``curve``). A link whose gateway
is no longer named and has been silent for the liveness period is closed.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from shared.gateways import endpoint_for
from shared.instanceconfig import InstanceConfig
from shared.linkkeys import instance_socket, link_route
from shared.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS

# a restarted gateway is found again within RECONNECT_IVL_MAX_MS; sane range 100-5000 ms
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000


class Link:
    """One gateway as this instance talks to it."""

    __slots__ = ("endpoint", "sock", "last_heard", "last_sent", "bye_acked")

    def __init__(self, endpoint: str, sock: zmq.Socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.last_heard = self.last_sent = time.monotonic()
        self.bye_acked = False


class InstanceLinks:
    def __init__(self, ctx: zmq.Context, identity: str, config: InstanceConfig) -> None:
        """``config``: the instance config; its ``gateways`` (endpoints), ``link`` (a sandboxed instance, which
        reaches gateways on its machine by their link sockets) and ``host`` (the machine's name)."""
        self.ctx = ctx
        self.identity = identity.encode()
        self.use_link = config.link
        self.link_dir = config.link_dir  # where a container sees the link directory
        self.host = config.host
        self.curve = config.curve  # keys every link (shared/linkkeys.py)
        self.links: dict[str, Link] = {}
        self.by_socket: dict[zmq.Socket, Link] = {}
        for endpoint in config.gateways:
            self.open(endpoint)

    def open(self, endpoint: str) -> Link:
        """A DEALER to one gateway: the only place an instance's gateway socket is set up."""
        sock = instance_socket(self.ctx.socket(zmq.DEALER), {"curve": self.curve})
        sock.setsockopt(zmq.LINGER, 2000)
        # the gateways know this instance by a routing id only it can make (its instance id is in its READY)
        sock.setsockopt(zmq.ROUTING_ID, link_route(self.curve["secret"].encode(), self.identity.decode()))
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint)
        link = self.links[endpoint] = Link(endpoint, sock)
        self.by_socket[sock] = link
        return link

    def learn(self, gateways: Any) -> tuple[list[Link], list[Link]]:
        """Follow a HEARTBEAT's list of live gateways: (links opened, links closed). A bad list is ignored."""
        if not isinstance(gateways, list):
            return [], []
        named = {endpoint_for(g, self.use_link, self.host, self.link_dir) for g in gateways if isinstance(g, dict)}
        named.discard("")
        opened = [self.open(e) for e in sorted(named) if e not in self.links]
        closed = []
        limit = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
        now = time.monotonic()
        for endpoint, link in list(self.links.items()):
            if endpoint not in named and now - link.last_heard > limit and len(self.links) > 1:
                closed.append(link)
                self.close_link(link)
        return opened, closed

    def close_link(self, link: Link, linger_ms: int = 0) -> None:
        self.links.pop(link.endpoint, None)
        self.by_socket.pop(link.sock, None)
        link.sock.close(linger=linger_ms)

    def __iter__(self) -> Any:
        return iter(list(self.links.values()))

    def close(self, linger_ms: int = 1000) -> None:
        for link in list(self.links.values()):
            self.close_link(link, linger_ms)
