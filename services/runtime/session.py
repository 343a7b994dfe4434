"""The requests-compatible session handed to Fusionizer-style tasks as ``requests_session``.

Fusionizer tasks build URLs like ``http://{Fusionizer-Server-Address}:8000/taskb``.
Such a request is a task call: served in-process when ``taskb`` is in this
instance's group, through the gateway otherwise, and answered with a real
``requests.Response`` either way, so task code runs unchanged whatever the fusion
setup. Any other URL is ordinary HTTP.
"""

from __future__ import annotations

import json as jsonlib
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

import requests
from requests.structures import CaseInsensitiveDict

if TYPE_CHECKING:  # pragma: no cover
    from services.runtime.calls import TaskCaller

FUSIONIZER_PORT = 8000  # the port Fusionizer task code writes into its URLs


class GatewaySession(requests.Session):
    def __init__(self, advertised_host: str, gateway_url: str, caller: "TaskCaller | None" = None) -> None:
        super().__init__()
        self._advertised_host = advertised_host
        self._port = urlsplit(gateway_url).port if gateway_url else None
        self._caller = caller
        self.trust_env = False  # calls to our own gateway must not go through a proxy

    def task_of(self, url: str) -> str | None:
        """The task a URL names when it points at the gateway (``/{task}``), else None."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != self._advertised_host:
            return None
        if parts.port not in (None, FUSIONIZER_PORT, self._port):
            return None
        segments = parts.path.strip("/").split("/")
        if len(segments) == 1 and segments[0]:
            return segments[0]
        if len(segments) == 3 and segments[0] == "functions" and segments[2] == "invoke":
            return segments[1]
        return None

    def request(self, method, url, params=None, data=None, headers=None, cookies=None, files=None, auth=None,
                timeout=None, allow_redirects=True, proxies=None, hooks=None, stream=None, verify=None, cert=None,
                json=None):  # type: ignore[override]
        task = self.task_of(str(url)) if self._caller is not None else None
        if task is None:
            return super().request(method, url, params=params, data=data, headers=headers, cookies=cookies,
                                   files=files, auth=auth, timeout=timeout, allow_redirects=allow_redirects,
                                   proxies=proxies, hooks=hooks, stream=stream, verify=verify, cert=cert, json=json)
        hdrs = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs.setdefault("content-type", "application/json")
        elif isinstance(data, (bytes, bytearray)):
            body = bytes(data)
        elif isinstance(data, str):
            body = data.encode()
        elif isinstance(data, dict):
            body = urlencode(data).encode()
            hdrs.setdefault("content-type", "application/x-www-form-urlencoded")
        else:
            body = b""
        query = urlsplit(str(url)).query
        if params:
            query = "&".join(filter(None, [query, urlencode(params, doseq=True)]))
        status, ctype, out = self._caller.request(
            task, str(method).upper(), body, hdrs.get("content-type", ""), [[k, v] for k, v in hdrs.items()],
            path=urlsplit(str(url)).path, query=query)
        return _response(str(url), status, ctype, out)


def _response(url: str, status: int, content_type: str, body: bytes) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body  # requests' own way to hold a body that is already read
    resp.headers = CaseInsensitiveDict({"content-type": content_type, "content-length": str(len(body))})
    resp.url = url
    resp.encoding = "utf-8" if content_type.startswith(("text/", "application/json")) else None
    resp.reason = "OK" if status < 400 else "Error"
    return resp

