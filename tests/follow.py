"""A client that follows a function's log (GET /functions/{name}/logs?follow=true) on a socket of its own."""

from __future__ import annotations

import socket
import threading
import urllib.parse

from tests.stack import Stack


class Follower:
    """One streaming GET on a socket of its own, read by a thread: the decoded body so far is ``text``.

    A plain socket, so close() is a real client leaving: shutdown() ends the read at once, whatever it waits for.
    """

    def __init__(self, stack: Stack, name: str, **params: str) -> None:
        self.chunks: list[str] = []
        self.status: int | None = None
        self.ended = threading.Event()  # the server ended the response (or the socket was closed)
        self.complete = False  # the server sent the last chunk
        self._sock = socket.create_connection(("127.0.0.1", int(stack.url.rsplit(":", 1)[1])), timeout=None)
        query = urllib.parse.urlencode({"follow": "true", **params})
        self._sock.sendall(f"GET /functions/{name}/logs?{query} HTTP/1.1\r\nHost: test\r\n"
                           f"Authorization: Bearer {stack.token}\r\n\r\n".encode())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                buf += self._recv()
            head, buf = buf.split(b"\r\n\r\n", 1)
            self.status = int(head.split(b" ", 2)[1])
            assert b"transfer-encoding: chunked" in head.lower(), head
            while True:
                while b"\r\n" not in buf:
                    buf += self._recv()
                size_line, buf = buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(buf) < size + 2:
                    buf += self._recv()
                if size == 0:
                    self.complete = True
                    return
                self.chunks.append(buf[:size].decode())
                buf = buf[size + 2:]
        except (OSError, EOFError):
            pass
        finally:
            self.ended.set()

    def _recv(self) -> bytes:
        data = self._sock.recv(65536)
        if not data:
            raise EOFError
        return data

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(10)
