"""The gateway's own HTTP/1.1 server, spoken to over raw sockets: what curl, browsers and load tools rely on."""

from __future__ import annotations

import socket

import pytest

from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

ECHO = "def handler(context, event):\n    return event.body\n"
HEADERS = (
    "def handler(context, event):\n"
    "    if event.body == b'crlf':\n"
    "        return context.Response(body='no', headers={'X-Bad': 'a\\r\\nInjected: yes'})\n"
    "    return context.Response(body='ok', headers={'X-Fine': 'yes', 'Bad Name': 'x', 'X-Tab': 'a\\tb',\n"
    "                                              'X-Nul': 'a\\x00b'}, status_code=201)\n"
)
SLOW = "import time\ndef handler(context, event):\n    time.sleep(0.5)\n    return 'slow'\n"


@pytest.fixture(scope="module")
def http_stack(stack: Stack) -> Stack:
    stack.deploy("hecho", {"function.yaml": function_yaml("hecho"), "main.py": ECHO})
    stack.deploy("hheaders", {"function.yaml": function_yaml("hheaders"), "main.py": HEADERS})
    stack.deploy("hslow", {"function.yaml": function_yaml("hslow"), "main.py": SLOW})
    return stack


def connect(s: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, buf: bytearray, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response from the stream (Content-Length or chunked); what follows stays in buf.

    ``head``: the answer to a HEAD request, which has no body whatever its headers say.
    """
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head; got {bytes(buf)[:200]!r}")
        buf += chunk
    raw_head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    buf[:] = rest
    if status == 100 or head:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body += rest[:size]
            buf[:] = rest[size + 2:]
            if size == 0:
                return status, headers, bytes(body)
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a body")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout_s: float = 3.0) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_pipelined_requests_are_answered_in_order(http_stack: Stack) -> None:
    s = http_stack
    with connect(s) as sock:
        sock.sendall(
            b"POST /hslow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond"
        )
        buf = bytearray()
        answers = [read_response(sock, buf) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200], answers
    assert answers[0][2] == b"slow", "the slow call answers first, though the others finished before it"
    assert answers[1][2] == b"first"
    assert b"ok" in answers[2][2] or b"status" in answers[2][2]
    assert answers[3][2] == b"second"


def test_keep_alive_serves_many_requests_on_one_connection(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        buf = bytearray()
        for i in range(50):
            body = f"call-{i}".encode()
            sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            status, headers, out = read_response(sock, buf)
            assert (status, out) == (200, body)
            assert headers["x-call-id"]


def test_chunked_request_body_reaches_the_function(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
    assert (status, body) == (200, b"hello world")


def test_expect_100_continue_is_answered_before_the_body(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        buf = bytearray()
        status, _, _ = read_response(sock, buf)
        assert status == 100, "curl waits a second for this before sending a body over 1 KB"
        sock.sendall(b"data")
        status, _, body = read_response(sock, buf)
    assert (status, body) == (200, b"data")


def test_expect_100_continue_over_the_limit_gets_413_without_the_body(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = read_response(sock, bytearray())
        assert status == 413 and b"invoke limit" in body
        assert headers.get("connection") == "close"
        assert closed_by_server(sock)


def test_body_over_the_limit_gets_413_and_the_client_reads_it(http_stack: Stack) -> None:
    big = b"x" * (7 * 1024 * 1024)
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        status, headers, body = read_response(sock, bytearray())
    assert status == 413 and b"over the" in body and headers.get("connection") == "close"


def test_malformed_request_gets_400_and_the_connection_closes(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
        assert status == 400 and b"invalid HTTP request" in body
        assert closed_by_server(sock)
    with connect(http_stack) as sock:  # the server still serves others
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        assert read_response(sock, bytearray())[2] == b"ok"


def test_oversized_request_head_gets_431(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
        assert status == 431 and b"over" in body
        assert closed_by_server(sock)


def test_response_headers_cannot_inject_or_break_the_response(http_stack: Stack) -> None:
    r = http_stack.invoke("hheaders")
    assert r.status_code == 201 and r.text == "ok"
    assert r.headers["x-fine"] == "yes" and r.headers["x-tab"] == "a\tb"
    assert "bad name" not in r.headers and "x-nul" not in r.headers, "invalid names and values are dropped"
    r = http_stack.invoke("hheaders", b"crlf")
    assert r.status_code == 500 and "X-Bad" in r.text and "line breaks" in r.text
    assert "injected" not in r.headers


def test_client_that_leaves_mid_call_does_not_disturb_others(http_stack: Stack) -> None:
    s = http_stack
    for _ in range(5):
        sock = connect(s)
        sock.sendall(b"POST /hslow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sock.close()
    r = s.invoke("hecho", b"still here")
    assert r.status_code == 200 and r.text == "still here"
    # queued behind the abandoned calls, whose answers have nowhere to go
    assert s.invoke("hslow").text == "slow"


def test_control_plane_and_invokes_share_a_connection(http_stack: Stack) -> None:
    s = http_stack
    with connect(s) as sock:
        buf = bytearray()
        auth = f"Authorization: Bearer {s.token}\r\n".encode()
        sock.sendall(b"GET /hecho HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        status, headers, body = read_response(sock, buf)
        assert status == 200 and b'"hecho"' in body and headers["content-type"].startswith("application/json")
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert read_response(sock, buf)[2] == b"abc"
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock, buf, head=True)
        # HEAD is GET without the body: the same status and headers, the length of the body it does not send
        assert status == 200 and headers["content-type"] == "application/json"
        assert int(headers["content-length"]) > 0
        status, _, body = read_response(sock, buf)
        assert status == 200 and body.startswith(b"{"), "the HEAD answer sent no body bytes"
        # a HEAD of a route that needs the token answers like its GET would
        sock.sendall(b"HEAD /functions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock, buf, head=True)[0] == 401
        sock.sendall(b"HEAD /functions HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        assert read_response(sock, buf, head=True)[0] == 200


def test_idle_keep_alive_connections_are_closed(http_stack: Stack) -> None:
    with connect(http_stack) as sock:
        sock.sendall(b"POST /hecho HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        assert read_response(sock, bytearray())[0] == 200
        assert not closed_by_server(sock, timeout_s=1.0), "a keep-alive connection stays open a while"
        assert closed_by_server(sock, timeout_s=10.0), "an idle connection is closed after the keep-alive timeout"
