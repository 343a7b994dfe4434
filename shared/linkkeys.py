"""The instance side of CURVE: its sockets to the gateways, keyed from its config (no other import).

An instance's config carries ``"curve": {"public", "secret", "server"}`` (z85), the keypair
the deployer issued for that instance and the gateways' public key (shared/curve.py).
Instances in containers import this module, so it needs nothing but pyzmq.
"""

from __future__ import annotations

from typing import Any, Mapping

import zmq


def curve_client(sock: zmq.Socket, public: bytes, secret: bytes, server: bytes) -> zmq.Socket:
    """Make ``sock`` a CURVE client of the server whose public key is ``server``; before connect."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return sock


def instance_socket(sock: zmq.Socket, config: Mapping[str, Any]) -> zmq.Socket:
    """Key an instance's socket to the gateways with its config's ``"curve"`` entry.

    Raises ValueError when the config has none: a gateway admits no instance without its key."""
    curve = config.get("curve")
    if not isinstance(curve, Mapping) or not all(isinstance(curve.get(k), str) for k in ("public", "secret", "server")):
        raise ValueError("the instance config has no CURVE keys ('curve': public, secret, server); the deployer"
                         " issues them, so start instances through it")
    return curve_client(sock, curve["public"].encode(), curve["secret"].encode(), curve["server"].encode())
