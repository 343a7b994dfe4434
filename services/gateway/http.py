"""The gateway's HTTP/1.1 server: httptools on the service's asyncio loop.

Sync invocations (``POST /{name}``, ``/functions/{name}/invoke`` and ``/execute``) are
the product's hot path, and they never become ASGI requests: the parsed request goes
to :meth:`Gateway.invoke_direct` with a callback that writes the whole response
(status line, headers and body) in one ``transport.write``. No task, no ASGI message
dicts, no coroutine per request. Under uvicorn the same path cost ~30 us more CPU
per request, most of it in two writes per response and a task per request
(BENCHMARKS.md has the figures).

Everything else (the control plane, async invokes, ``/docs``) is served to the ASGI
app given (FastAPI) in a task per request: request bodies stream in with flow
control, responses stream out (chunked when the app gives no Content-Length).

Per connection, requests are answered in order (HTTP/1.1 pipelining): a request
parsed while another is still being answered waits, and reading pauses. Idle
keep-alive connections close after ``KEEPALIVE_S``; a request head larger than
``MAX_HEAD_BYTES`` gets 431, a malformed request 400, and the connection closes.
A request body must keep arriving: after a grace period (``http_body_grace_s``) it
must average at least ``http_min_body_rate`` bytes a second while we read it, or it
gets 408 and the connection closes (slow-body attacks hold no connection for long).
"""

from __future__ import annotations

import asyncio
import http
import re
import time
import urllib.parse
from collections import deque
from typing import Any, Callable

import httptools

from shared.errors import error_body
from shared.logs import get_logger

log = get_logger(__name__)

KEEPALIVE_S = 5.0  # idle keep-alive connections are closed after this long
MAX_HEAD_BYTES = 64 * 1024  # request line + headers
DISCARD_LIMIT = 64 * 1024 * 1024  # the body of a refused invoke read and dropped before closing
BODY_HIGH_WATER = 256 * 1024  # an ASGI request body buffered beyond this pauses reading

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (CR, LF, NUL, ...) but not tab
_INTERNAL_ERROR = error_body("internal", "internal error; see the gateway log")


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} \r\n".encode()
    return line


def valid_header(name: bytes, value: bytes) -> bool:
    """A header a response may carry: a token name and a value without control characters."""
    return _TOKEN.fullmatch(name) is not None and _BAD_VALUE.search(value) is None


def response_head(status: int, headers: list[tuple[bytes, bytes]], length: int | None, keep_alive: bool) -> list[bytes]:
    parts = [status_line(status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if length is not None:
        parts.append(b"content-length: %d\r\n" % length)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return parts


class HeadTooLarge(Exception):
    pass


class DirectRequest:
    """A sync invocation read in full; :meth:`respond` answers it (once)."""

    __slots__ = ("conn", "method", "path", "query", "headers", "body", "name", "mode", "done", "keep_alive",
                 "complete", "size", "refused", "received", "expect_continue", "limit")

    def __init__(self, conn: "HttpProtocol", method: str, path: str, query: bytes,
                 headers: list[tuple[bytes, bytes]], name: str, mode: str, keep_alive: bool, limit: int) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body: bytes | bytearray = b""
        self.size = 0
        self.name = name
        self.mode = mode
        self.keep_alive = keep_alive
        self.complete = False
        self.done = False
        self.refused: int | None = None  # the body size when it is over the limit (answered 413 unread)
        self.received = False  # the whole message was parsed (a refused body is read and dropped)
        self.expect_continue = False  # the client waits for "100 Continue" before sending the body
        self.limit = limit  # the largest body the function takes

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        if conn.closed:
            return
        keep_alive = self.keep_alive and not conn.closing
        parts = response_head(status, headers, len(body), keep_alive)
        if self.method != "HEAD":
            parts.append(body)
        conn.transport.write(b"".join(parts))
        if self.refused is not None and not self.received:
            # close once the client has sent its body: closing now would reset the connection
            # before the client reads the 413
            conn.close_after_body = True
            return
        conn.finished(self, keep_alive)

    def start(self) -> None:
        """Answer it, now that it is first in line, once it was read in full (or refused)."""
        if self.done:
            return
        if not self.complete:
            if self.expect_continue and not self.conn.closed:
                self.expect_continue = False
                self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        if self.refused is not None:
            self.conn.server.refuse(self)
        else:
            self.conn.server.direct(self)


class AsgiCycle:
    """One request served by the ASGI app."""

    def __init__(self, conn: "HttpProtocol", scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body = bytearray()
        self.dropped = 0
        self.more_body = True
        self.delivered = False  # the app has received the whole body
        self.event = asyncio.Event()
        self.started = False  # the task runs
        self.response_started = False
        self.head_written = False
        self.response_complete = False
        self.chunked = False
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None

    @property
    def complete(self) -> bool:
        return not self.more_body

    def start(self) -> None:
        self.started = True
        self.conn.server.spawn(self.run())

    def on_body(self, chunk: bytes) -> None:
        if self.response_complete:
            # answered without reading it all (e.g. 413): the rest is dropped, up to a bound
            self.dropped += len(chunk)
            if self.dropped > DISCARD_LIMIT:
                self.conn.close()
            return
        self.body += chunk
        if len(self.body) > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self.event.set()

    def on_complete(self) -> None:
        self.more_body = False
        self.event.set()

    def disconnected(self) -> None:
        self.event.set()

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        if self.expect_continue and not self.response_started and not conn.closed:
            conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False
        if not conn.closed and not self.response_complete:
            conn.resume_reading()
            if self.more_body and not self.body:
                self.event.clear()
                await self.event.wait()
            # once the whole body was handed over, the next message is the disconnect: an app that listens
            # for it while it streams (Starlette's FileResponse and StreamingResponse) must wait here, not spin
            while self.delivered and not (conn.closed or self.response_complete):
                self.event.clear()
                await self.event.wait()
        if conn.closed or self.response_complete:
            return {"type": "http.disconnect"}
        body = bytes(self.body)
        self.body.clear()
        self.delivered = not self.more_body
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        conn = self.conn
        kind = message["type"]
        if conn.write_paused and not conn.closed:
            await conn.drain()
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.response_started = True
            self.status = int(message["status"])
            for name, value in message.get("headers") or ():
                name = bytes(name).lower()
                value = bytes(value)
                if not valid_header(name, value):
                    raise RuntimeError(f"invalid response header {name[:40]!r}")
                if name == b"content-length":
                    self.length = int(value)
                    continue
                if name in (b"connection", b"transfer-encoding"):
                    if name == b"connection" and value.lower() == b"close":
                        self.keep_alive = False
                    continue
                self.headers.append((name, value))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        if self.response_complete:
            return
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        head_only = self.scope["method"] == "HEAD"
        parts: list[bytes] = []
        if not self.head_written:
            self.head_written = True
            length = self.length
            if length is None and not more:
                length = len(body)
            headers = self.headers
            if length is None:
                self.chunked = True
                headers = headers + [(b"transfer-encoding", b"chunked")]
            keep_alive = self.keep_alive and not conn.closing
            self.keep_alive = keep_alive
            parts += response_head(self.status, headers, length, keep_alive)
        if body and not head_only:
            if self.chunked:
                parts += (b"%x\r\n" % len(body), body, b"\r\n")
            else:
                parts.append(body)
        if not more:
            if self.chunked and not head_only:
                parts.append(b"0\r\n\r\n")
            self.response_complete = True
            self.event.set()  # a receive() waiting for the disconnect returns
        if parts and not conn.closed:
            conn.transport.write(b"".join(parts))
        if self.response_complete:
            self.body.clear()  # what the app did not read is not needed any more
            conn.finished(self, self.keep_alive)

    async def run(self) -> None:
        conn = self.conn
        try:
            await conn.server.app(self.scope, self.receive, self.send)
        except BaseException as exc:  # the app failed: answer 500 if we still can, else drop the connection
            if not isinstance(exc, Exception):
                conn.close()
                raise
            log.exception("request handler failed", path=self.scope.get("path"))
            if not self.response_started and not conn.closed:
                self._internal_error()
            else:
                conn.close()
            return
        if not self.response_complete and not conn.closed:
            if not self.response_started:
                log.error("request handler returned without a response", path=self.scope.get("path"))
                self._internal_error()
            else:
                conn.close()

    def _internal_error(self) -> None:
        body = _INTERNAL_ERROR
        self.response_started = self.head_written = self.response_complete = True
        self.keep_alive = False
        self.conn.transport.write(b"".join(response_head(
            500, [(b"content-type", b"application/json")], len(body), False)) + body)
        self.conn.finished(self, False)


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: "HttpServer") -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.closed = False
        self.closing = False  # the server is shutting down: close after the current response
        self.read_paused = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self.cycles: deque[Any] = deque()  # requests parsed and not answered yet; the first is being answered
        self.current: Any = None  # the request being parsed
        self.last_active = time.monotonic()
        self.client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._expect_continue = False
        self._length: bytes | None = None
        self.close_after_body = False
        self.body_clock = 0.0  # when the body being read started arriving (reset when we resume reading)
        self.body_seen = 0  # its bytes since body_clock

    # ----- connection ---------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for cycle in self.cycles:
            if isinstance(cycle, AsgiCycle):
                cycle.disconnected()
        if self.current is not None and self.current not in self.cycles and isinstance(self.current, AsgiCycle):
            self.current.disconnected()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
            self.closed = True
            self.server.connections.discard(self)

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed and len(self.cycles) <= 1:
            self.read_paused = False
            self.body_clock, self.body_seen = time.monotonic(), 0  # paused time is ours, not the client's
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HeadTooLarge:
            self._reject(431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades (WebSocket) are not supported here")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._reject(431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes")
            else:
                self._reject(400, "invalid HTTP request")

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we cannot read (and everything after it on this connection) and close."""
        if self.closed:
            return
        body = error_body("invalid_request", message)
        if not any(getattr(c, "response_started", False) or getattr(c, "done", False) for c in self.cycles):
            self.transport.write(b"".join(response_head(
                status, [(b"content-type", b"application/json")], len(body), False)) + body)
        self.close()

    # ----- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._expect_continue = False
        self._length: bytes | None = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge()
        # names keep the caller's spelling (a function reads them back as sent); ASGI gets them lower-cased
        lower = name.lower()
        if lower == b"content-length":
            self._length = value
        elif lower == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method().decode("ascii")
        parsed = httptools.parse_url(self._url)
        raw_path = parsed.path
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        query = parsed.query or b""
        keep_alive = parser.should_keep_alive()
        server = self.server
        target = server.direct_target(method, path, self._headers)
        if target is not None:
            limit = server.body_limit(target[0])  # the function's own, or the platform's default
            # the function sees the path below its own name
            request: Any = DirectRequest(self, method, target[2], query, self._headers, target[0], target[1],
                                         keep_alive, limit)
            declared = server.too_large(self._length, limit) if self._length is not None else None
            if declared is not None:
                # answered without reading the body; the connection closes after it
                request.refused = declared
                request.complete = True
                request.keep_alive = False
                if self._expect_continue:
                    request.received = True  # the client waits for our answer before any body: none comes
            else:
                request.expect_continue = self._expect_continue  # "100 Continue" when it is first in line
        else:
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": parser.get_http_version(),
                "server": server.bound,
                "client": self.client,
                "scheme": "http",
                "method": method,
                "root_path": "",
                "path": path,
                "raw_path": raw_path,
                "query_string": query,
                "headers": [(name.lower(), value) for name, value in self._headers],
                "state": {},
                "nuclide.headers": self._headers,  # as sent: what an async invocation's function reads back
            }
            request = AsgiCycle(self, scope, keep_alive, self._expect_continue)
        self.current = request
        self.body_clock, self.body_seen = time.monotonic(), 0
        self.cycles.append(request)
        if len(self.cycles) == 1:
            request.start()
        else:
            self.pause_reading()  # pipelined: it waits for the answers before it

    def on_body(self, chunk: bytes) -> None:
        self.body_seen += len(chunk)
        request = self.current
        if isinstance(request, DirectRequest):
            if request.complete:
                # refused: the rest of its body is dropped, up to a bound
                request.size += len(chunk)
                if request.size > DISCARD_LIMIT:
                    self.close()
                return
            request.size += len(chunk)
            if request.size > request.limit:
                request.refused = request.size
                request.complete = True
                request.keep_alive = False
                request.body = b""
                if self.cycles and self.cycles[0] is request:
                    request.start()
                return
            if request.body:
                if not isinstance(request.body, bytearray):
                    request.body = bytearray(request.body)
                request.body += chunk
            else:
                request.body = chunk
        elif request is not None:
            request.on_body(chunk)

    def on_message_complete(self) -> None:
        request = self.current
        self.current = None
        if isinstance(request, DirectRequest):
            request.received = True
            if request.complete:
                if self.close_after_body:
                    self.close()
                return
            if isinstance(request.body, bytearray):
                request.body = bytes(request.body)
            request.complete = True
            if self.cycles and self.cycles[0] is request:
                request.start()
        elif request is not None:
            request.on_complete()

    # ----- answers --------------------------------------------------------------------

    def finished(self, request: Any, keep_alive: bool) -> None:
        """The first request in line was answered: close, or start the next one."""
        if self.cycles and self.cycles[0] is request:
            self.cycles.popleft()
        self.last_active = time.monotonic()
        if not keep_alive or self.closing:
            self.close()
            return
        if self.cycles:
            nxt = self.cycles[0]
            if not (isinstance(nxt, AsgiCycle) and nxt.started):
                nxt.start()
        self.resume_reading()

    def shutdown(self) -> None:
        """The server stops: close now if idle, else after the answer being written."""
        self.closing = True
        if not self.cycles:
            self.close()


class HttpServer:
    """Serves the gateway on one TCP port; see the module docstring."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, *,
                 direct_target: Callable[[str, str, list], tuple[str, str, str] | None],
                 direct: Callable[[DirectRequest], None], refuse: Callable[[DirectRequest], None],
                 body_limit: Callable[[str], int], backlog: int = 4096, body_grace_s: float = 10.0,
                 min_body_rate: int = 1024) -> None:
        """``direct_target``: (function, mode, path below it) when a request is a sync invocation to answer
        directly, else None; ``direct`` starts one (``request.respond`` gets the answer); ``refuse`` answers one
        whose body is over ``body_limit(function)`` bytes."""
        self.body_grace_s = body_grace_s
        self.min_body_rate = min_body_rate
        self.app = app
        self.host = host
        self.port = port
        self.backlog = backlog
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task] = set()
        self.bound: tuple[str, int] | None = (host, port)
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None
        self.direct_target = direct_target
        self.direct = direct
        self.refuse = refuse
        self.body_limit = body_limit  # a function's largest invocation body

    async def start(self) -> None:
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self), self.host, self.port, backlog=self.backlog, reuse_address=True)
        sock = self._server.sockets[0].getsockname() if self._server.sockets else None
        if sock:
            self.bound = (str(sock[0]), int(sock[1]))
        self._sweeper = asyncio.ensure_future(self._sweep_idle())

    @staticmethod
    def too_large(content_length: bytes, limit: int) -> int | None:
        """The declared Content-Length when it is over ``limit`` (the parser checked its syntax)."""
        try:
            declared = int(content_length)
        except ValueError:
            return None
        return declared if declared > limit else None

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            limit = now - KEEPALIVE_S
            for conn in list(self.connections):
                if not conn.cycles and conn.current is None and conn.last_active < limit:
                    conn.close()
                elif conn.current is not None and not conn.read_paused and self.too_slow(conn, now):
                    log.info("closed a connection whose request body was too slow", client=conn.client,
                             seen_bytes=conn.body_seen, seconds=round(now - conn.body_clock, 1))
                    conn._reject(408, f"the request body arrived slower than {self.min_body_rate} bytes a second"
                                      f" after the first {self.body_grace_s:g} s; send it faster or in one piece")

    def too_slow(self, conn: HttpProtocol, now: float) -> bool:
        """A body being read that has fallen behind the minimum rate, once its grace period is over."""
        late_s = now - conn.body_clock - self.body_grace_s
        return late_s > 0 and conn.body_seen < self.min_body_rate * late_s

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let answers in progress finish (up to ``timeout_s``), then close everything."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
