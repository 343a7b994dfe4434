"""The requests-compatible session handed to Fusionizer-style tasks as ``requests_session``.

Fusionizer tasks build URLs like ``http://{Fusionizer-Server-Address}:8000/taskb``.
The session sends those to the gateway that actually served the call (whatever
its port), so task code written for the Fusionizer runs unchanged.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import requests

FUSIONIZER_PORT = 8000  # the port Fusionizer task code writes into its URLs


class GatewaySession(requests.Session):
    def __init__(self, advertised_host: str, gateway_url: str) -> None:
        super().__init__()
        self._advertised_host = advertised_host
        target = urlsplit(gateway_url)
        self._scheme, self._netloc, self._port = target.scheme, target.netloc, target.port
        self.trust_env = False  # calls to our own gateway must not go through a proxy

    def rewrite(self, url: str) -> str:
        parts = urlsplit(url)
        if (parts.scheme == "http" and parts.hostname == self._advertised_host
                and parts.port in (None, FUSIONIZER_PORT, self._port)):
            return urlunsplit((self._scheme, self._netloc, parts.path, parts.query, parts.fragment))
        return url

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        return super().request(method, self.rewrite(str(url)), *args, **kwargs)
