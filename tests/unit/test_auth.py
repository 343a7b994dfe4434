"""The API token check: what the gateway accepts as `Authorization: Bearer <token>`, and what it refuses."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.auth import check_bearer, load_or_create_token, may_call_private, token_path
from shared.config import Secret, Settings
from shared.errors import Unauthorized

TOKEN = b"s3cret-token"


@pytest.mark.parametrize("header", [
    "Bearer s3cret-token", b"Bearer s3cret-token", "bearer s3cret-token", "BEARER s3cret-token",
    "Bearer s3cret-token  ", "Bearer  s3cret-token",
])
def test_accepted(header: str | bytes) -> None:
    check_bearer(header, TOKEN)  # no exception


@pytest.mark.parametrize("header,reason", [
    (None, "missing token"), ("", "missing token"), (b"", "missing token"),
    ("s3cret-token", "invalid token"),              # no scheme
    ("Basic s3cret-token", "invalid token"),        # another scheme
    ("Bearers3cret-token", "invalid token"),        # no space
    ("Bearer", "invalid token"), ("Bearer ", "invalid token"),
    ("Bearer s3cret-toke", "invalid token"),        # a prefix of the token
    ("Bearer s3cret-token2", "invalid token"),      # the token and more
    ("Bearer S3CRET-TOKEN", "invalid token"),       # the token is case-sensitive, the scheme is not
    ("Token s3cret-token", "invalid token"),
    ("Bearer s3cret-token extra", "invalid token"),
    ("Bearer s3cr\u00e9t-token", "invalid token"),  # latin-1, not the token
    ("Bearer s3cret-token\u2603", "invalid token"),  # not latin-1: replaced, refused like any wrong token
])
def test_refused_with_a_message_that_says_what_to_send(header: str | bytes | None, reason: str) -> None:
    with pytest.raises(Unauthorized) as info:
        check_bearer(header, TOKEN)
    assert info.value.message.startswith(reason) and "Authorization: Bearer <token>" in info.value.message
    assert info.value.http_status == 401


def test_the_token_file_is_made_once_mode_0600_and_reused(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "deep" / "var")  # missing parents are made
    token = load_or_create_token(settings)
    path = token_path(settings)
    assert path == tmp_path / "deep" / "var" / "token" and path.read_text() == token + "\n"
    assert len(token) == 43, "32 random bytes, URL-safe base64"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(settings) == token, "a restart keeps the token"
    path.write_text("  edited-token \n")
    assert load_or_create_token(settings) == "edited-token"


def test_a_configured_token_wins_and_writes_no_file(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var", token=Secret("from-env"))
    assert load_or_create_token(settings) == "from-env"
    assert not token_path(settings).exists()


def test_a_token_file_is_made_in_an_existing_state_directory(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    assert load_or_create_token(Settings(var_dir=tmp_path / "var")) == (tmp_path / "var" / "token").read_text().strip()


@pytest.mark.parametrize("callee_group, allowed, caller_group, caller_function, may", [
    ("g-vault", (), "g-vault", "vault-helper", True),  # its own fusion group
    ("g-vault", (), "g-other", "other", False),
    ("g-vault", ("friend",), "g-friend", "friend", True),
    ("g-vault", ("friend",), "g-stranger", "stranger", False),
    ("g-vault", ("*",), "g-stranger", "stranger", True),
    ("g-vault", ("*",), None, None, False),  # a caller not tied to a running function: not even "*" lets it in
    ("g-vault", ("friend",), "g-friend", None, False),
    (None, (), None, None, False),  # neither group known: no match by two Nones
])
def test_who_may_call_a_private_function(callee_group: str | None, allowed: tuple[str, ...],
                                         caller_group: str | None, caller_function: str | None, may: bool) -> None:
    assert may_call_private(callee_group, frozenset(allowed), caller_group, caller_function) is may
