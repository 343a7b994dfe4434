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

from shared.names import invoke_target

if TYPE_CHECKING:  # pragma: no cover
    from services.runtime.context_calls import TaskCaller

FUSIONIZER_PORT = 8000  # the port Fusionizer task code writes into its URLs


class GatewaySession(requests.Session):
    def __init__(self, advertised_host: str, gateway_url: str, caller: "TaskCaller | None" = None) -> None:
        super().__init__()
        self._advertised_host = advertised_host
        self._port = urlsplit(gateway_url).port if gateway_url else None
        self._caller = caller
        self.trust_env = False  # calls to our own gateway must not go through a proxy

    def task_of(self, url: str) -> tuple[str, str] | None:
        """(task, path below it) when a URL points at the gateway (``/{task}[/sub/path]``), else None."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != self._advertised_host:
            return None
        if parts.port not in (None, FUSIONIZER_PORT, self._port):
            return None
        # any method: a task call is the request the callee's handler gets, whatever the verb
        target = invoke_target("POST", parts.path)
        if target is None or target[1] != "http":
            return None
        return target[0], target[2]

    def request(self, method, url, params=None, data=None, headers=None, cookies=None, files=None, auth=None,
                timeout=None, allow_redirects=True, proxies=None, hooks=None, stream=None, verify=None, cert=None,
                json=None):  # type: ignore[override]
        target = self.task_of(str(url)) if self._caller is not None else None
        if target is None:
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
        status, ctype, out, rheaders = self._caller.request(
            target[0], str(method).upper(), body, hdrs.get("content-type", ""), [[k, v] for k, v in hdrs.items()],
            path=target[1], query=query)
        return _response(str(url), status, ctype, out, rheaders)


def _response(url: str, status: int, content_type: str, body: bytes, headers: list) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body  # requests' own way to hold a body that is already read
    resp.headers = CaseInsensitiveDict({str(k): str(v) for k, v in headers})
    resp.headers.update({"content-type": content_type, "content-length": str(len(body))})
    resp.url = url
    resp.encoding = "utf-8" if content_type.startswith(("text/", "application/json")) else None
    resp.reason = "OK" if status < 400 else "Error"
    return resp

