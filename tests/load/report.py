"""The numbers of a load run, from what was sent and the call records found, and their one-screen report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FINAL = ("DONE", "FAILED", "DEAD")


def parse_iso(text: str | None) -> float | None:
    """The store's timings ('2024-01-01T12:00:00.123Z') as epoch seconds."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Sent:
    """What the sending phase did."""

    sent: int = 0  # messages handed over (push/pub) or requests made (http)
    accepted: int = 0  # push: handed to ZeroMQ; pub: published; http: answered 202 with a call id
    rejected: dict[str, int] = field(default_factory=dict)  # why not accepted -> how many
    first_send: float | None = None  # epoch seconds
    last_send: float | None = None
    stopped_by: str = ""  # "count", "duration", "blocked", ...
    ids: list[str] = field(default_factory=list)  # call ids of accepted calls, when known (push, http)

    def note_rejected(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1


@dataclass
class Tracked:
    """What waiting for completion found."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> last record seen (final or not)
    missing: list[str] = field(default_factory=list)  # accepted ids never found (push, http)
    waited_s: float = 0.0
    ended_by: str = ""  # "all final", "wait", "stall"
    extra: int = 0  # pub: more calls found than messages published


@dataclass
class Result:
    mode: str
    function: str
    url: str
    self_contained: bool
    plan: dict[str, Any]
    sent: int
    accepted: int
    rejected: int
    rejected_by: dict[str, int]
    completed: int
    failed: int
    lost: int
    lost_not_found: int
    lost_not_final: int
    retried: int
    send_s: float
    offered_per_s: float | None
    throughput_per_s: float | None
    span_s: float | None
    latency_ms: dict[str, float | None]
    waited_s: float
    wait_ended_by: str
    stopped_by: str
    extra: int
    lost_examples: list[str]
    failed_examples: list[dict[str, Any]]

    @property
    def lost_is_failure(self) -> bool:
        # Topic delivery is best effort by design; only push and http promise not to lose accepted calls.
        return self.mode != "pub" and self.lost > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(mode: str, function: str, url: str, self_contained: bool, plan: dict[str, Any], sent: Sent,
              tracked: Tracked) -> Result:
    finals = [r for r in tracked.records.values() if r.get("status") in FINAL]
    done = [r for r in finals if r["status"] == "DONE"]
    failed = [r for r in finals if r["status"] != "DONE"]
    not_final = len(tracked.records) - len(finals)
    accepted = sent.accepted
    lost = max(0, accepted - len(finals))
    latencies = []
    last_finish = None
    for rec in done:
        timings = rec.get("timings") or {}
        queued, finished = parse_iso(timings.get("queued")), parse_iso(timings.get("finished"))
        if queued is not None and finished is not None:
            latencies.append(max(0.0, finished - queued) * 1000.0)
        if finished is not None and (last_finish is None or finished > last_finish):
            last_finish = finished
    span = (last_finish - sent.first_send) if (last_finish is not None and sent.first_send is not None) else None
    send_s = (sent.last_send - sent.first_send) if (sent.first_send is not None and sent.last_send is not None) else 0.0

    def ms(value: float | None) -> float | None:
        return round(value, 3) if value is not None else None

    lost_ids = list(tracked.missing) + [i for i, r in tracked.records.items() if r.get("status") not in FINAL]
    return Result(
        mode=mode, function=function, url=url, self_contained=self_contained, plan=plan,
        sent=sent.sent, accepted=accepted, rejected=sum(sent.rejected.values()), rejected_by=dict(sent.rejected),
        completed=len(done), failed=len(failed), lost=lost,
        lost_not_found=len(tracked.missing) if mode != "pub" else max(0, lost - not_final),
        lost_not_final=not_final,
        retried=sum(1 for r in finals if int(r.get("attempts") or 0) > 1),
        send_s=round(send_s, 3),
        offered_per_s=round(sent.sent / send_s, 1) if send_s > 0 else None,
        throughput_per_s=round(len(done) / span, 1) if span and span > 0 else None,
        span_s=round(span, 3) if span is not None else None,
        latency_ms={"p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99)),
                    "max": ms(max(latencies) if latencies else None),
                    "mean": ms(sum(latencies) / len(latencies) if latencies else None)},
        waited_s=round(tracked.waited_s, 3), wait_ended_by=tracked.ended_by, stopped_by=sent.stopped_by,
        extra=tracked.extra, lost_examples=lost_ids[:10],
        failed_examples=[{"id": r["id"], "status": r["status"], "error": (r.get("error") or "")[:200]}
                         for r in failed[:5]],
    )


def _num(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def render(res: Result) -> str:
    """The one-screen report; each count is on a line of its own, 'name  value', for humans and for grep."""
    plan = res.plan
    rate = "max" if not plan.get("rate") else f"{plan['rate']:g}/s"
    where = "self-contained stack at " if res.self_contained else ""
    accepted_means = {"push": "handed to ZeroMQ (PUSH has no acknowledgement)",
                      "pub": "published (topic delivery is best effort)",
                      "http": "answered 202 with a call id"}[res.mode]
    lines = [
        f"nuclide load: {res.mode} -> {res.function} ({where}{res.url})",
        f"  plan        count {plan['count']}, rate {rate}, duration <= {plan['duration_s']:g} s,"
        f" wait <= {plan['wait_s']:g} s",
        f"  sent        {res.sent} in {res.send_s:.2f} s ({_num(res.offered_per_s, '/s')} offered; stopped by"
        f" {res.stopped_by})",
        f"  accepted    {res.accepted:<7} {accepted_means}",
        f"  rejected    {res.rejected:<7} "
        + (", ".join(f"{k}: {v}" for k, v in sorted(res.rejected_by.items())) or "refused at submission"),
        f"  completed   {res.completed:<7} DONE",
        f"  failed      {res.failed:<7} FAILED or DEAD",
        f"  lost        {res.lost:<7} accepted, but never found ({res.lost_not_found}) or not final by the end"
        f" ({res.lost_not_final})",
        f"  throughput  {_num(res.throughput_per_s, ' calls/s')} end to end (completed / first send -> last"
        f" finish, {_num(res.span_s, ' s', 2)})",
        f"  latency     p50 {_num(res.latency_ms['p50'], ' ms')}  p99 {_num(res.latency_ms['p99'], ' ms')}"
        f"  max {_num(res.latency_ms['max'], ' ms')}  (queued -> finished, DONE calls)",
        f"  retried     {res.retried:<7} final calls that took more than one attempt",
        f"  waited      {res.waited_s:.1f} s for completion (ended: {res.wait_ended_by})",
    ]
    if res.extra:
        lines.append(f"  note        {res.extra} more topic call(s) found than messages published"
                     " (another publisher on the topic?)")
    if res.mode == "pub" and res.lost:
        lines.append("  note        topic delivery is best effort: messages published while the subscription"
                     " was not up, or beyond a high-water mark, are dropped")
    if res.mode == "push" and res.accepted and res.lost_not_found == res.accepted:
        lines.append("  note        no pushed call reached the stack: is --pull the gateway's gateway_pull endpoint?")
    if res.lost_examples:
        lines.append(f"  lost ids    {', '.join(res.lost_examples[:3])}{' ...' if res.lost > 3 else ''}")
    for example in res.failed_examples[:3]:
        first = example["error"].splitlines()[0] if example["error"] else ""
        lines.append(f"  failed e.g. {example['id']} {example['status']}: {first[:100]}")
    return "\n".join(lines)


def write_json(res: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res.to_json(), indent=2) + "\n")
