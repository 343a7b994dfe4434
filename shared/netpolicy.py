"""Which addresses the platform itself may send requests to on a user's behalf (callback URLs).

A callback URL comes from whoever submits a call, so by default it may not point inside the
platform's own network: loopback, link-local, private, shared, multicast, unspecified and other
reserved ranges are refused. An operator opens exceptions with the ``callback_allow`` setting: a
comma-separated list of networks (``127.0.0.0/8``, ``::1/128``) and host names (``hooks.internal``).
The URL is checked when the call is submitted (a literal address or a loopback name gives a clear
400 at once) and every address its host resolves to is checked again right before the POST, so a
name that resolves inward is refused there too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import InvalidRequest

MAX_URL_CHARS = 2000
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _inward(addr: Address) -> bool:
    """An address inside the host or its private network rather than on the public internet."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return _inward(addr.ipv4_mapped)
    return (addr.is_loopback or addr.is_link_local or addr.is_private or addr.is_multicast
            or addr.is_unspecified or addr.is_reserved or not addr.is_global)


@dataclass(frozen=True)
class CallbackPolicy:
    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "CallbackPolicy":
        """The policy of a ``callback_allow`` setting; raises ValueError naming a bad entry."""
        networks: list[Network] = []
        hosts: set[str] = set()
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not all(part and len(part) < 64 and part.replace("-", "").isalnum() for part in entry.split(".")):
                raise ValueError(f"callback_allow entry {raw.strip()!r} is neither a network"
                                 " nor a host name; write networks in CIDR form")
            hosts.add(entry)
        return cls(tuple(networks), frozenset(hosts))

    def _allowed(self, addr: Address) -> bool:
        return any(addr in net for net in self.networks)

    def check_url(self, url: object) -> str | None:
        """The URL when it may be submitted, None for none; raises InvalidRequest saying why not."""
        if url is None or url == "":
            return None
        if not isinstance(url, str):
            raise InvalidRequest(f"callback_url must be a string, not {type(url).__name__}")
        if len(url) > MAX_URL_CHARS:
            raise InvalidRequest(f"X-Callback-Url is {len(url)} characters, over the {MAX_URL_CHARS} limit")
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            host, parts = "", None
        if parts is None or parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
            raise InvalidRequest(f"X-Callback-Url {url[:100]!r} is not an http(s) URL")
        if host in self.hosts:
            return url
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(host, literal)
        elif host in LOOPBACK_NAMES or host.endswith(".localhost"):
            raise InvalidRequest(self._refusal(host, "a loopback name"))
        return url

    def check_address(self, host: str, addr: Address) -> None:
        if _inward(addr) and not self._allowed(addr):
            raise InvalidRequest(self._refusal(host, f"the internal address {addr}"))

    async def check_resolved(self, url: str) -> None:
        """Resolve the URL's host and refuse it when any address it has is inward and not allowed."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        if host in self.hosts:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise InvalidRequest(f"callback host {host!r} does not resolve: {exc}") from None
        for info in infos:
            self.check_address(host, ipaddress.ip_address(info[4][0].split("%", 1)[0]))

    @staticmethod
    def _refusal(host: str, what: str) -> str:
        return (f"callback host {host!r} is {what}; callbacks to loopback, link-local and private networks are"
                " refused unless the operator allows them with the callback_allow setting")
