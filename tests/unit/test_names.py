"""Tests for shared/names.py: which function names are accepted, and what the errors say."""

from __future__ import annotations

import pytest

from shared.errors import InvalidRequest
from shared.names import NAME_RE, RESERVED_NAMES, validate_function_name


@pytest.mark.parametrize("name", ["a", "A", "7", "hello", "Hello-World_2", "x" * 63, "0abc", "a-", "a_"])
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_function_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 64, "-a", "_a", "a/b", "a.b", "a b", "a\n", "é", "a:b", "../x", "a\x00"],
)
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        validate_function_name(name)
    message = exc_info.value.message
    assert repr(name) in message
    assert "is invalid: use 1-63 letters, digits, '-' or '_', starting with a letter or digit" in message


def test_error_message_matches_the_documented_form() -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        validate_function_name("a/b")
    assert exc_info.value.message == (
        "function name 'a/b' is invalid: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
    )


@pytest.mark.parametrize("name", ["docs", "DOCS", "Healthz", "async-function", "functions", "ui", "Admin"])
def test_reserved_names_are_refused_case_insensitively(name: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        validate_function_name(name)
    assert exc_info.value.message == f"function name {name!r} is reserved for the API; choose another name"


def test_reserved_names_with_dots_are_refused_by_the_pattern_first() -> None:
    # openapi.json and favicon.ico are reserved routes, and dots are not valid anyway.
    for name in ("openapi.json", "favicon.ico"):
        assert name in RESERVED_NAMES
        with pytest.raises(InvalidRequest):
            validate_function_name(name)


def test_reserved_set_is_complete() -> None:
    expected = {
        "functions", "function", "calls", "traces", "groups", "runtimes", "healthz", "health", "metrics", "docs",
        "redoc", "openapi.json", "optimizer", "async-function", "api", "static", "favicon.ico", "system",
        "version", "login", "admin", "ui",
    }
    assert RESERVED_NAMES == expected
    assert isinstance(RESERVED_NAMES, frozenset)


def test_name_re_is_anchored_by_fullmatch_users() -> None:
    assert NAME_RE.fullmatch("abc")
    assert NAME_RE.fullmatch("abc/def") is None
    assert NAME_RE.fullmatch("x" * 64) is None


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        validate_function_name(None)  # type: ignore[arg-type]
