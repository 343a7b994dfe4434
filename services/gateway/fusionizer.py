"""The Nuclio Fusionizer's plain-text answers, for its scripts (curl, then grep) and any client that asks for text.

Text mode: a request whose ``Accept`` prefers ``text/plain`` over JSON, or, with the gateway's
``fusionizer_mode`` on, one that names neither (no ``Accept``, or curl's default ``*/*``). In text
mode ``PUT``, ``GET`` and ``DELETE /{task}`` answer as the Fusionizer's API server does, and a
deploy or an invocation that fails answers 422 with the reason as text, as its server does.
Everything else, and every other client, gets JSON.
"""

from __future__ import annotations

import json
from typing import Any

FAILED_STATUS = 422  # what the Fusionizer answers for any failed deploy, describe, delete or invocation
TEXT = "text/plain; charset=utf-8"
# an invocation with one of these is not a failed task: the caller has to fix its own request
_NOT_TASK_FAILURES = frozenset({401, 429})


def wants_text(accept: str | None, fusionizer_mode: bool) -> bool:
    """Whether a request with this ``Accept`` header gets plain-text answers (see the module docstring)."""
    text_q = json_q = None
    for part in (accept or "").split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        if media not in ("text/plain", "text/*", "application/json", "application/*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.startswith("text/"):
            text_q = max(text_q or 0.0, q)
        else:
            json_q = max(json_q or 0.0, q)
    if text_q is None and json_q is None:
        return fusionizer_mode
    return (text_q or 0.0) > (json_q or 0.0)


def is_task_failure(status: int) -> bool:
    return status >= 400 and status not in _NOT_TASK_FAILURES


def failure_text(content_type: str, body: bytes) -> bytes:
    """The reason of a failed answer as text: a JSON error's message (and a build's log tail), else the body."""
    if content_type.startswith("application/json"):
        try:
            doc: Any = json.loads(body)
        except ValueError:
            return body
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict) and "message" in error:
            text = str(error["message"])
            tail = (error.get("details") or {}).get("log_tail") if isinstance(error.get("details"), dict) else None
            return (f"{text}\n{tail}" if tail else text).encode()
    return body


def deployed(name: str, ready: bool = True) -> str:
    """The answer to a deploy: ready, or (asked for asynchronously) accepted and on its way."""
    return f"Successfully deployed Task '{name}'" if ready else f"Deploying Task '{name}'"


def deleted(name: str) -> str:
    return f"Successfully deleted Task '{name}'"


def not_found(name: str) -> str:
    return f"No Task '{name}' could be found"


def describe(name: str, desc: dict[str, Any], http_port: int) -> str:
    """``GET /{task}`` as the Fusionizer writes it; its group is a Python list of the task names."""
    tasks = list((desc.get("group") or {}).get("tasks") or [name])
    others = str(tasks) if len(tasks) > 1 else "None"
    return (f"Task '{name}':\n"
            f"Currently deployed with other Tasks: {others}\n"
            f"Status: {desc.get('state')}\n"
            f"HTTP port: {http_port}")
