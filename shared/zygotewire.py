"""The deployer and its zygote over a Unix SOCK_SEQPACKET socket: one msgpack map per message, descriptors beside it."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 1 << 20


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket, max_fds: int = 1) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors sent with it; (None, []) once the peer has closed its end."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE_BYTES, max_fds)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = msgpack.unpackb(data, raw=False)
    if not isinstance(message, dict):
        raise ValueError("a zygote message must be a map")
    return message, fds
