"""The caller's credentials stop at the gateway: no invocation path hands the Authorization header to function code."""

from __future__ import annotations

from typing import Any

import pytest

from tests.stack import Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

# Returns the header names it was given; a private twin makes the token required, so it must be sent.
HEADERS_SEEN = """
def handler(context, event):
    return {"names": sorted(k.lower() for k in event.headers.keys()),
            "values": sorted(str(v) for v in event.headers.values())}
"""


@pytest.fixture(scope="module")
def seers(stack: Stack) -> tuple[str, str]:
    stack.deploy("hdr-public", {"function.yaml": function_yaml("hdr-public"), "main.py": HEADERS_SEEN})
    stack.deploy("hdr-private", {"function.yaml": function_yaml("hdr-private", private=True), "main.py": HEADERS_SEEN})
    return "hdr-public", "hdr-private"


def _assert_no_credentials(stack: Stack, seen: dict[str, Any]) -> None:
    assert "x-test" in seen["names"], f"the probe header did not arrive, so the check proves nothing: {seen}"
    assert "authorization" not in seen["names"], f"the handler saw the caller's Authorization header: {seen}"
    assert not any(stack.token in v for v in seen["values"]), f"the handler saw the token: {seen}"


def _finished(stack: Stack, call_id: str) -> dict[str, Any]:
    rec = wait_for(lambda: (c := stack.client.get(f"/calls/{call_id}").json())["status"] in ("DONE", "FAILED", "DEAD")
                   and c, 30, what=f"call {call_id} to finish")
    assert rec["status"] == "DONE", rec
    return rec["result"]


@pytest.mark.parametrize("spelling", ["Authorization", "authorization", "AUTHORIZATION"])
def test_sync_calls_never_see_the_token(stack: Stack, seers: tuple[str, str], spelling: str) -> None:
    for name in seers:
        for path in (f"/{name}", f"/functions/{name}/invoke"):
            r = stack.anon.post(path, json={}, headers={spelling: f"Bearer {stack.token}", "X-Test": "1"})
            assert r.status_code == 200, r.text
            _assert_no_credentials(stack, r.json())


@pytest.mark.parametrize("spelling", ["Authorization", "authorization", "AUTHORIZATION"])
def test_async_calls_never_see_the_token(stack: Stack, seers: tuple[str, str], spelling: str) -> None:
    creds = {spelling: f"Bearer {stack.token}", "X-Test": "1"}
    for name in seers:
        submits = [stack.anon.post(f"/{name}", json={}, headers={**creds, "X-Nuclide-Async": "true"}),
                   stack.anon.post(f"/async-function/{name}", json={}, headers=creds),
                   stack.anon.post(f"/functions/{name}/invoke", json={}, headers={**creds, "X-Nuclide-Async": "true"})]
        for r in submits:
            assert r.status_code == 202, r.text
            _assert_no_credentials(stack, _finished(stack, r.json()["call_id"]))
