"""The callback address policy: what the platform may POST to on a submitter's behalf."""

from __future__ import annotations

import asyncio

import pytest

from shared.config import ConfigError, load_settings
from shared.errors import InvalidRequest
from shared.netpolicy import CallbackPolicy

DEFAULT = CallbackPolicy.parse("")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/h", "http://127.1.2.3:8080/h", "http://[::1]/h", "http://localhost/h", "http://LOCALHOST/h", "http://localhost./h",
    "http://app.localhost/h", "http://0.0.0.0/h", "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/h",
    "http://[fe80::1]/h", "http://224.0.0.1/h", "http://100.64.0.1/h",
])
def test_inward_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(InvalidRequest, match="callback_allow"):
        DEFAULT.check_url(url)


@pytest.mark.parametrize("url", ["ftp://x/h", "http://", "http:///path", "https://a b/h", "http://h:99999/", "x" * 10,
                                 "http://h/" + "p" * 2000])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest, match="X-Callback-Url"):
        DEFAULT.check_url(url)


@pytest.mark.parametrize("value", [{"a": 1}, ["x"], 5])
def test_non_string_urls_are_refused(value: object) -> None:
    with pytest.raises(InvalidRequest, match="must be a string"):
        DEFAULT.check_url(value)


def test_public_names_and_addresses_pass_and_empty_means_none() -> None:
    assert DEFAULT.check_url("https://hooks.example.com/x?y=1") == "https://hooks.example.com/x?y=1"
    assert DEFAULT.check_url("http://8.8.8.8/x") == "http://8.8.8.8/x"
    assert DEFAULT.check_url("") is None and DEFAULT.check_url(None) is None


def test_allow_list_opens_networks_and_names_only() -> None:
    policy = CallbackPolicy.parse(" 127.0.0.0/8 , hooks.internal,::1/128")
    assert policy.check_url("http://127.0.0.1:9/h") and policy.check_url("http://[::1]/h")
    assert policy.check_url("http://hooks.internal/h")
    with pytest.raises(InvalidRequest):
        policy.check_url("http://169.254.169.254/h")


def test_names_are_checked_by_what_they_resolve_to() -> None:
    # localhost resolves through /etc/hosts, no network needed
    with pytest.raises(InvalidRequest, match="internal address 127.0.0.1"):
        asyncio.run(CallbackPolicy().check_resolved("http://localhost:1/h"))
    asyncio.run(CallbackPolicy.parse("127.0.0.0/8,::1/128").check_resolved("http://localhost:1/h"))


@pytest.mark.parametrize("bad", ["not a host!", "a..b", "-"])
def test_bad_allow_entries_fail_settings_with_their_name(bad: str) -> None:
    with pytest.raises(ConfigError, match="callback_allow entry"):
        load_settings(environ={"NUCLIDE_CALLBACK_ALLOW": f"127.0.0.0/8,{bad}"})
