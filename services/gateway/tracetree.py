"""A W3C trace as a tree: the store's flat list of a trace's calls (calls.trace) made into nested calls.

A call's parent is the call its ``parent_id`` names. An in-process task call of an unsampled trace
is not recorded, and its id is its caller's id plus ``.n`` (services/runtime/context_calls.py), so a
call whose parent is missing hangs under the nearest recorded ancestor that id names; its
``parent_span`` still names the real parent. Calls with no recorded ancestor are roots.
"""

from __future__ import annotations

from typing import Any


def nearest_recorded(parent_id: str | None, recorded: dict[str, Any]) -> str | None:
    """The id of the nearest recorded call among ``parent_id`` and the callers its id names, or None."""
    while parent_id:
        if parent_id in recorded:
            return parent_id
        parent_id, dot, _ = parent_id.rpartition(".")
        if not dot:
            return None
    return None


def build(trace: dict[str, Any]) -> dict[str, Any]:
    """``{"trace_id", "calls", "truncated", "roots": [call, ...]}``, each call with its ``children``, oldest first."""
    nodes: dict[str, dict[str, Any]] = {}
    for c in trace["calls"]:
        nodes[c["id"]] = {
            "id": c["id"], "function": c["function"], "span_id": c["span_id"], "parent_id": c["parent_id"],
            "parent_span": c["parent_span"], "status": c["status"], "result_status": c["result_status"],
            "mode": "fused" if c["fused"] else "remote", "kind": c["kind"], "source": c["source"],
            "started": c["started"], "started_ts": c["started_ts"], "duration_ms": c["duration_ms"],
            "error": c["error"], "children": []}
    roots = []
    for node in nodes.values():  # oldest first, so children are too
        parent = nearest_recorded(node["parent_id"], nodes)
        if parent is None or parent == node["id"]:
            roots.append(node)
        else:
            nodes[parent]["children"].append(node)
    return {"trace_id": trace["trace_id"], "calls": len(nodes), "truncated": bool(trace.get("truncated")),
            "roots": roots}

