"""The CLI's HTTP client for the nuclide API, and the one-line errors it turns failures into."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0
# The longest function timeout the spec allows is 3600 s; the gateway answers 504 before this.
INVOKE_TIMEOUT_S = 3700.0
_CONNECT_TIMEOUT_S = 5.0
_TOKEN_HINT = "pass --token or set NUCLIDE_TOKEN (the command that started the stack prints it)"


class CliError(Exception):
    """An expected failure: the CLI prints ``message`` as one line and exits non-zero."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None, *,
                 status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where to send requests, the token to send, and what to say when that token is refused."""

    url: str
    token: str | None = field(repr=False)
    token_from: str = ""  # where the token came from: "given by --token", "in NUCLIDE_TOKEN", the stacks file
    token_help: str = ""  # how to get the right token for this URL
    started_by: str = ""  # what started the stack at this URL, when that was recorded


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    # `--url localhost:8000` is what people type; httpx would refuse it for lack of a scheme.
    if url and "://" not in url:
        url = "http://" + url
    return url


def unauthorized(target: Target) -> str:
    """Why the stack refused the request, where the token came from and how to get the right one; never the token."""
    if not target.token:
        why = "no token was sent"
    else:
        why = f"nuclide at {target.url} rejected the token" + (f" {target.token_from}" if target.token_from else "")
    return f"unauthorized: {why}; {target.token_help or _TOKEN_HINT}"


def error_from_response(resp: httpx.Response, target: Target) -> CliError:
    """One actionable line from an error answer, using the server's {"error": {...}} body when there is one."""
    status = resp.status_code
    err: dict[str, Any] = {}
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
    except ValueError:
        pass
    message = str(err.get("message") or "").strip()
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    code = str(err["code"]) if err.get("code") else None
    if status == 401:
        return CliError(unauthorized(target), details, status=status, code=code or "unauthorized")
    if not message:
        text = " ".join(resp.text.split())[:200]
        message = f"HTTP {status} from {target.url}" + (f": {text}" if text else "")
    return CliError(message, details, status=status, code=code)


def _path(name: str) -> str:
    # Names are validated by the server; quoting keeps a stray '/' or '?' from reaching another route.
    return quote(name, safe="")


class Client:
    """One method per API call: parsed JSON back, or a CliError."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None, *, target: Target | None = None) -> None:
        """``target`` (from resolve_target) replaces url and token, and says where its token came from."""
        self.target = target or Target(normalise_url(url), token)
        self.url = self.target.url
        self.token = self.target.token
        # Per request, not a client default, so invoke can leave it out.
        self._auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            # JSON even from a gateway in fusionizer_mode, which answers curl's default */* with text
            headers = {"User-Agent": "nuclide-cli", "Accept": "application/json"}
            self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                      timeout=httpx.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S))
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"invalid nuclide URL {self.url!r} ({exc}); pass --url like {DEFAULT_URL}") from None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None, send_token: bool = True,
                **kw: Any) -> httpx.Response:
        """Send one request; transport failures become a CliError, HTTP statuses are left to the caller."""
        merged = {**(self._auth if send_token else {}), **(headers or {})}
        try:
            return self._http.request(method, path, headers=merged, **kw)
        except httpx.ConnectError:
            if self.target.started_by:
                raise CliError(f"cannot reach nuclide at {self.url}, which {self.target.started_by} started:"
                               " is it still running?") from None
            raise CliError(f"cannot reach nuclide at {self.url}: is `nuclide up` running?") from None
        except httpx.TimeoutException:
            raise CliError(f"nuclide at {self.url} did not answer in time; retry, or pass a longer --timeout",
                           code="client_timeout") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise CliError(f"invalid nuclide URL {self.url!r} ({exc}); pass --url like {DEFAULT_URL}") from None
        except httpx.HTTPError as exc:
            raise CliError(f"request to nuclide at {self.url} failed: {exc or type(exc).__name__}") from None

    def _checked(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            raise error_from_response(resp, self.target)
        return resp

    def _json(self, resp: httpx.Response) -> Any:
        self._checked(resp)
        try:
            return resp.json()
        except ValueError:
            raise CliError(f"nuclide at {self.url} sent a response that is not JSON (HTTP {resp.status_code});"
                           " is --url pointing at nuclide?") from None

    # ----- API calls --------------------------------------------------------------

    def deploy(self, name: str, zip_bytes: bytes, *, wait: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        """PUT the package; with wait the server answers once the function is ready (or failed)."""
        headers = {} if wait else {"X-Nuclide-Async": "true"}
        kw: dict[str, Any] = {}
        if timeout_s is not None:
            kw["timeout"] = httpx.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S)
        resp = self.request("PUT", f"/functions/{_path(name)}", headers=headers,
                            files={"zip_file": (f"{name}.zip", zip_bytes, "application/zip")}, **kw)
        return self._json(resp)

    def get_function(self, name: str) -> dict[str, Any]:
        return self._json(self.request("GET", f"/functions/{_path(name)}"))

    def list_functions(self) -> list[dict[str, Any]]:
        return self._json(self.request("GET", "/functions"))

    def delete_function(self, name: str) -> None:
        self._checked(self.request("DELETE", f"/functions/{_path(name)}"))

    def scale(self, name: str, replicas: int | None) -> dict[str, Any]:
        """Hold the function's replicas at ``replicas``; None gives them back to the autoscaler."""
        return self._json(self.request("PUT", f"/functions/{_path(name)}/replicas", json={"replicas": replicas}))

    def logs(self, name: str, tail: int = 200, since: str | None = None) -> str:
        params: dict[str, Any] = {"tail": tail, **({"since": since} if since else {})}
        return self._checked(self.request("GET", f"/functions/{_path(name)}/logs", params=params)).text

    def follow_logs(self, name: str, tail: int = 200, since: str | None = None,
                    on_open: Callable[[socket.socket | None], None] | None = None) -> Iterator[str]:
        """The recent lines, then each new one as the server streams it, until the caller stops iterating.

        ``on_open`` gets the stream's socket once the response starts: shutting it down from another thread
        ends the iteration at once, however long the function stays quiet."""
        params: dict[str, Any] = {"tail": tail, "follow": "true", **({"since": since} if since else {})}
        try:
            # no read timeout: a quiet function sends nothing for as long as it is quiet
            with self._http.stream("GET", f"/functions/{_path(name)}/logs", params=params, headers=self._auth,
                                   timeout=httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S)) as resp:
                if on_open is not None:
                    stream = resp.extensions.get("network_stream")
                    on_open(stream.get_extra_info("socket") if stream is not None else None)
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_response(resp, self.target)
                yield from resp.iter_text()
        except httpx.ConnectError:
            raise CliError(f"cannot reach nuclide at {self.url}: is `nuclide up` running?") from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            raise CliError(f"nuclide at {self.url} closed the log stream (did it stop?)") from None

    def invoke(self, name: str, body: bytes = b"", *, method: str = "POST", headers: Mapping[str, str] | None = None,
               timeout_s: float | None = None) -> httpx.Response:
        """Call the function; any HTTP status comes back as is, since the body is the function's answer.

        The token is sent only when the gateway asks for it (a private function): the gateway
        passes request headers on to the function, which has no business seeing the API token.
        """
        headers = dict(headers or {})
        # Only POST is an invoke route; other methods on /{name} are the API (DELETE /{name} deletes it).
        path = f"/{_path(name)}" if method == "POST" else f"/functions/{_path(name)}/invoke"
        timeout = httpx.Timeout(timeout_s or INVOKE_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)
        resp = self.request(method, path, content=body, headers=headers, timeout=timeout, send_token=False)
        own_auth = any(k.lower() == "authorization" for k in headers)
        if resp.status_code == 401 and self._auth and not own_auth and _is_gateway_401(resp):
            resp = self.request(method, path, content=body, headers=headers, timeout=timeout)
        return resp

    # ----- calls ------------------------------------------------------------------

    def list_calls(self, function: str | None = None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if function:
            params["function"] = function
        if status:
            params["status"] = status
        return self._json(self.request("GET", "/calls", params=params))

    def get_call(self, call_id: str) -> dict[str, Any]:
        return self._json(self.request("GET", f"/calls/{_path(call_id)}"))

    def call_trace(self, call_id: str) -> dict[str, Any]:
        """The W3C trace a call is part of, as a tree of calls."""
        return self._json(self.request("GET", f"/calls/{_path(call_id)}/trace"))

    def call_result(self, call_id: str) -> httpx.Response:
        """The stored result as the function answered it (any status); 202 while the call is not final.

        The answer carries X-Call-Status; an error without it is the API's own (unknown call, bad token).
        """
        resp = self.request("GET", f"/calls/{_path(call_id)}/result")
        if resp.status_code >= 400 and "x-call-status" not in resp.headers:
            raise error_from_response(resp, self.target)
        return resp

    def redrive_call(self, call_id: str) -> dict[str, Any]:
        return self._json(self.request("POST", f"/calls/{_path(call_id)}/redrive"))

    def purge_calls(self, status: str, function: str | None = None) -> int:
        params = {"status": status, **({"function": function} if function else {})}
        return int(self._json(self.request("DELETE", "/calls", params=params)).get("purged", 0))


def _is_gateway_401(resp: httpx.Response) -> bool:
    """True when the 401 is the gateway's own refusal (the function never ran), not the function's answer."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(err, dict) and err.get("code") == "unauthorized"
