"""The instance side of CURVE: its sockets to the gateways, keyed from its config (no other import).

An instance's config carries ``"curve": {"public", "secret", "server"}`` (z85), the keypair
the deployer issued for that instance and the gateways' public key (shared/curve.py).
Instances in containers import this module, so it needs nothing but pyzmq.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Mapping

import zmq
import zmq.utils.z85


def curve_client(sock: zmq.Socket, public: bytes, secret: bytes, server: bytes) -> zmq.Socket:
    """Make ``sock`` a CURVE client of the server whose public key is ``server``; before connect."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return sock


def link_route(secret: bytes, instance_id: str) -> bytes:
    """The routing id an instance's links use: made from its CURVE secret key (z85) and its id.

    Only the instance and the gateways (which derive every instance's keys) can make it, so no other peer
    can connect under it, not even after the instance's connection is gone: a gateway's INVOKEs for an
    instance can reach nothing but that instance. It starts with "r" (libzmq keeps ids that start with a
    zero byte for itself)."""
    digest = hmac.new(zmq.utils.z85.decode(secret), b"nuclide-route\0" + instance_id.encode(), hashlib.sha256)
    return b"r" + digest.digest()[:16]


def instance_socket(sock: zmq.Socket, config: Mapping[str, Any]) -> zmq.Socket:
    """Key an instance's socket to the gateways with its config's ``"curve"`` entry.

    Raises ValueError when the config has none: a gateway admits no instance without its key."""
    curve = config.get("curve")
    if not isinstance(curve, Mapping) or not all(isinstance(curve.get(k), str) for k in ("public", "secret", "server")):
        raise ValueError("the instance config has no CURVE keys ('curve': public, secret, server); the deployer"
                         " issues them, so start instances through it")
    return curve_client(sock, curve["public"].encode(), curve["secret"].encode(), curve["server"].encode())
