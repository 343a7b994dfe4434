"""A tiny producer for the gateway's ZeroMQ ingress: push invoke messages, publish on topics.

    from shared.ingress import Producer
    with Producer("tcp://127.0.0.1:5561", "tcp://127.0.0.1:5562") as p:
        p.invoke("resize", b'{"url": "..."}', content_type="application/json")
        p.publish("orders", b'{"id": 7}')

``invoke`` blocks when the gateway's queue is full (ZeroMQ's high-water mark)
rather than dropping. ``token`` (the gateway's ``ingress_token`` setting, or its API
token) goes with every message: private functions take messages only with it. The frame
layout is in services/gateway/ingress.py.

``curve=(public, secret, gateway_public)`` (z85 bytes): for a gateway whose
``producer_public_keys`` lists this producer's public key (the ingress then takes CURVE
connections from those keys only); without it the connection is plain, as the
ingress is by default, and each message is judged by its token alone.
"""

from __future__ import annotations

from typing import Any

import zmq

from shared import protocol
from shared.linkkeys import curve_client


class Producer:
    def __init__(self, pull_endpoint: str | None = None, sub_endpoint: str | None = None,
                 ctx: zmq.Context | None = None, sndhwm: int = 1000, token: str = "",
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self._token = token
        self._push = self._pub = None

        def socket(kind: int) -> zmq.Socket:
            sock = self._ctx.socket(kind)
            return curve_client(sock, *curve) if curve else sock

        if pull_endpoint:
            self._push = socket(zmq.PUSH)
            self._push.setsockopt(zmq.SNDHWM, sndhwm)
            self._push.setsockopt(zmq.LINGER, 10_000)  # messages still queued at close get 10 s to leave
            self._push.connect(pull_endpoint)
        if sub_endpoint:
            self._pub = socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 1000)
            self._pub.connect(sub_endpoint)

    def invoke(self, function: str, payload: bytes = b"", *, content_type: str = "", call_id: str | None = None,
               idempotency_key: str | None = None, callback_url: str | None = None,
               headers: list[list[str]] | None = None) -> None:
        if self._push is None:
            raise RuntimeError("this Producer has no PULL endpoint to invoke through")
        header: dict[str, Any] = {"function": function}
        if self._token:
            header["token"] = self._token
        for key, value in (("content_type", content_type), ("call_id", call_id), ("idempotency_key", idempotency_key),
                           ("callback_url", callback_url), ("headers", headers)):
            if value:
                header[key] = value
        self._push.send_multipart(protocol.encode(protocol.INVOKE, header, payload))

    def publish(self, topic: str, payload: bytes = b"", *, content_type: str = "",
                idempotency_key: str | None = None) -> None:
        if self._pub is None:
            raise RuntimeError("this Producer has no SUB endpoint to publish to")
        header = {k: v for k, v in (("content_type", content_type), ("idempotency_key", idempotency_key),
                                    ("token", self._token)) if v}
        if header:
            self._pub.send_multipart([topic.encode(), *protocol.encode(protocol.INVOKE, header, payload)])
        else:
            self._pub.send_multipart([topic.encode(), payload])

    def close(self) -> None:
        for sock in (self._push, self._pub):
            if sock is not None:
                sock.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
