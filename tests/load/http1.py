"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for sending load.

httpx's async connection pool spends more CPU per request than the gateway does
per async submission (about 90 requests/s at 64 connections on a 2-CPU machine
against 4000/s from wrk), so the generator would measure itself. One connection
per worker, one request at a time on it, Content-Length bodies (what the
gateway's invoke path sends); a chunked answer is read too.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


class Connection:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise HTTPError(f"only http:// URLs are supported, not {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authority = parts.netloc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self._reader = self._writer = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes,
                      timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """One request; a connection the server closed in between is reopened once."""
        for attempt in (0, 1):
            fresh = self._writer is None
            if fresh:
                await self._connect()
            try:
                return await asyncio.wait_for(self._exchange(method, path, headers, body), timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                await self.close()
                if fresh or attempt:
                    raise HTTPError(f"connection failed: {exc!r}") from None
            except asyncio.TimeoutError:
                await self.close()
                raise HTTPError(f"no answer within {timeout_s:g} s") from None
        raise HTTPError("unreachable")  # pragma: no cover

    async def _exchange(self, method: str, path: str, headers: dict[str, str],
                        body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._reader is not None and self._writer is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.authority}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await self._writer.drain()
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HTTPError(f"bad status line {lines[0][:100]!r}") from None
        out_headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                out_headers[key.strip().lower()] = value.strip()
        if out_headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._read_chunked()
        else:
            data = await self._reader.readexactly(int(out_headers.get("content-length") or 0))
        if out_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, out_headers, data

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)
