"""Writing the results: ``BENCHMARKS.md`` (the table people read) and the machine-readable JSON.

The "What we tried" section of an existing BENCHMARKS.md is carried over into the
new one (it is written by hand, between the two marker comments), so
regenerating the figures never loses the history of what was tried.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tests.bench.model import MEASURED, SKIPPED, Row, ScenarioResult, Target

TRIED_START = "<!-- what-we-tried:start (kept when BENCHMARKS.md is regenerated; edit freely) -->"
TRIED_END = "<!-- what-we-tried:end -->"

TRIED_DEFAULT = """\
- Measured before choosing the gateway design (on the same
  machine): `zmq.asyncio` DEALER -> ROUTER round trips gave about 10.9k req/s; watching the
  DEALER's FD with `loop.add_reader` and draining with `NOBLOCK` (what `shared/aiosock.py`
  does) about 14.8k req/s, 0.47x bare ASGI in the same run. FastAPI (about 7.4k req/s)
  is kept off the invoke path: invocations take a raw ASGI route.
- Pipelining up to 32 calls to an instance while its calls are fast (the broker's credit)
  was measured at about 2.5x the throughput of one call at a time for short handlers.
- First profile of the invoke path (py-spy, 64 connections, before any change): the gateway
  is the bottleneck (the instance's loop is about 70 % idle in `poll`). About a quarter
  of the gateway's samples are uvicorn's two `transport.write` calls per response (the
  bare ASGI app pays the same), about 10 % pyzmq `send` with `copy=False` (a Frame
  object per part; for small frames a plain copying send measured about 2 us cheaper per
  message), and 2-3 % enum arithmetic inside pyzmq's `send_multipart` (`SNDMORE | flags`
  builds IntFlag objects each part). Every drain ends in a `zmq.Again`, whose constructor
  runs two `from ... import` statements (about 6 us per raise). Not changed yet.
- Cold start (a fresh instance, no zygote): at the first profile importing
  `services.runtime.loop` took about 190 ms, of which `requests` (for Fusionizer-style
  tasks only) was about 80 ms; once it was no longer imported at start the import took
  about 105 ms (`python -X importtime`), `asyncio` about 50 ms of it. Interpreter
  teardown adds 30-40 ms to every instance stop (`import` and exit vs `import` and
  `os._exit`).
- Measuring pitfall fixed in the harness itself: `subprocess.Popen.wait(timeout)` polls
  with sleeps doubling up to 50 ms, which rounded process times up to 31.5, 63.5, ...,
  263.5, 313.5 ms; the harness now waits on a pidfd.
- Still to try (issue 6): other ASGI servers (granian); a warm zygote per runtime
  environment that forks instances (about 2 ms from fork to first ZeroMQ message here, vs
  about 40 ms for a fresh interpreter importing pyzmq).
"""

NOTES = """\
- **2 cores, shared.** The load generator (wrk, one thread), the server under test and,
  for nuclide, the gateway *and* the function's instance all run on the same 2 cores.
  Nuclide does two process hops per call (HTTP -> gateway -> ZeroMQ -> instance -> back)
  where the baselines answer in the HTTP process, so it pays for a third busy process
  on a machine with two cores.
- **One connection is a ping-pong** between wrk and the server: its figures depend on
  whether the two land on the same core, and moved up to 2x between otherwise quiet runs
  here (bare ASGI at 1 connection: 9k-21k req/s). Compare CPU per request, which moves less.
- **The hop to an instance**: the row "one round trip to another process" times a 1-byte
  message echoed by a second process, over ZeroMQ (ROUTER and DEALER on tcp loopback, as
  the gateway and an instance talk) and over a unix socket pair, and says what 1-connection
  throughput a gateway adding only that round trip to a bare ASGI request could reach.
- **Same run, one at a time.** Each baseline server and the nuclide stack are started
  alone, warmed up, measured, and stopped before the next one starts. Ratios are
  nuclide / baseline from the same run (for latencies, above 1 means nuclide is slower).
- **The baselines** run the same handler (`def handler(context, event): return "ok"`):
  a bare ASGI app and a FastAPI app (`async def` route reading the body, PlainTextResponse),
  each under uvicorn with uvloop and httptools, one worker process, with the options the
  gateway itself uses (no access log, no `server`/`date` headers).
- **Load**: `wrk --latency` with a Lua script (`wrk.method = "POST"`, empty body) for a
  fixed duration per point; req/s, p50 and p99 as wrk reports them. Non-2xx responses
  and socket errors are counted as errors and flag the row; no timing is asserted.
- **CPU per request**: user + system time of each process under test (from
  `/proc/<pid>/stat`) over the point, divided by the requests served; this is the cost
  of the hot path and moves less than req/s when the machine is busy. "Others' CPU share"
  is the CPU time the whole machine spent on processes that were neither ours nor wrk
  (`/proc/stat` minus what we account for), as a share of all cores; rows whose points
  had more than 10 % are measured again (up to `--retries` times, the least disturbed
  attempt kept) and marked DISTURBED if they still were, because this machine is shared.
- **Cold start**: deploy -> first response is timed from sending `PUT /{name}` (a name
  never used before) to the first `200 ok` of `POST /{name}`; the floor is a fresh
  interpreter from the same venv importing the runtime, in the same run.
- **Density**: PSS from `/proc/<pid>/smaps_rollup`, summed over every process of every
  instance (bwrap, its PID-namespace init, the runtime's python), divided by the number
  of instances; MB = 10^6 bytes.
- **Async throughput**: N no-op calls (`--calls`, 5,000; 300 with `--quick`) pushed over
  ZeroMQ to the gateway's PULL ingress, each with a call id of ours; the clock stops when a
  read-only query of the store's SQLite database (WAL) finds all N DONE with their result
  stored (polled every 5 ms), and a sample is checked through `GET /calls/{id}`. The
  baseline is Celery with a `redis-server` of our own (loopback, `--save '' --appendonly
  no`: no persistence, unlike nuclide's store) as broker and result backend, a worker with
  2 prefork processes (nuclide runs the handler in one instance process, with the gateway
  and the store on the path), and a client process that calls `delay()` N times, then
  `get()` on every result. Both sides are warmed up first (a tenth of N). CPU per call
  counts every process of each side, the client included; others' CPU share is not told
  for a run shorter than 0.5 s (clock-tick noise).
- **Fusion**: tasks t1..t5 each `context.call` the next and t5 returns "ok"; `POST /t1`
  at 1 connection (wrk, as for sync invoke) with every task its own instance, then after
  `PUT /groups?wait=true` with the five in one group, next to a single no-op task on the
  same stack. Whether the calls ran local or remote is checked from the call-graph trace
  before each point. Once the superseded instances have exited, the no-op task and the
  fused chain are warmed up once each, then measured alternately in nine points of half the
  usual length each, and their median p50s compared (one point at 1 connection moves by up
  to a third between otherwise equal runs, so many short points say more than a few long ones).
- Everything talks to 127.0.0.1 only, runs for a bounded time, and every process the
  benchmark starts is stopped (checked at the end; leftovers are reported below).
"""


def _num(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if unit in ("req/s", "calls/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        if value < 1:
            return f"{value:.3f} ms"
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "us":
        return f"{value:,.0f} us"
    if unit == "MB":
        return f"{value:.2f} MB" if value < 10 else f"{value:.1f} MB"
    return f"{value:g} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_cells(row: Row) -> list[str]:
    if row.status == SKIPPED:  # nuclide's figure stands; the comparison could not be made here
        return [row.metric, _num(row.nuclide, row.unit), "skipped", "—", row.target.text if row.target else "—",
                "—", row.notes]
    if row.status != MEASURED:
        nuclide = "not implemented yet" if row.status == "not implemented yet" else f"pending: {row.pending_on}"
        return [row.metric, nuclide, "—", "—", row.target.text if row.target else "—", "—",
                "" if row.notes in ("not implemented yet", f"pending: {row.pending_on}") else row.notes]
    baseline = _num(row.baseline, row.unit)
    if row.baseline is not None and row.baseline_label:
        baseline += f" ({row.baseline_label})"
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
    met = {True: "yes", False: "**no**", None: "—"}[row.met]
    notes = row.notes
    if row.flagged:
        met = f"{met} ⚠ {row.errors} errors"
        notes = f"⚠ {notes}"
    return [row.metric, _num(row.nuclide, row.unit), baseline, ratio, row.target.text if row.target else "—",
            met, notes]


def results_table(results: list[ScenarioResult]) -> str:
    lines = ["| scenario | nuclide | baseline | ratio | target | met? | notes |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        if res.status in ("failed", "skipped"):
            lines.append("| " + " | ".join(_cell(c) for c in [
                f"{res.title}: **{res.status.upper()}**", "—", "—", "—", "—", "—",
                (res.error.strip().splitlines() or [""])[0][:300]]) + " |")
        for row in res.rows:
            lines.append("| " + " | ".join(_cell(c) for c in _row_cells(row)) + " |")
    return "\n".join(lines)


def _details_sync(raw: dict[str, Any]) -> str:
    lines = ["| server | connections | req/s | p50 | p90 | p99 | requests | errors | CPU per request (us) | wrk CPU"
             " per request (us) | others' CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for server, points in raw.items():
        if not isinstance(points, dict):
            continue
        for key, r in points.items():
            if key == "warmup" or not isinstance(r, dict):
                continue
            cpu = r.get("cpu_us_per_request") or {}
            cpu_text = " + ".join(f"{who} {v:.0f}" for who, v in cpu.items() if v >= 0.5 or len(cpu) == 1)
            if len(cpu) > 1:
                cpu_text += f" = {sum(cpu.values()):.0f}"
            lines.append(f"| {server} | {r['connections']} | {r['rps']:,.0f} | {r['p50_ms']:.3f} ms | "
                         f"{r['p90_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {r['requests']:,} | {r['errors']} | {cpu_text} | "
                         f"{r.get('wrk_cpu_us_per_request', 0):.0f} | {r.get('other_cpu_share', 0) * 100:.0f} % |")
    return "\n".join(lines)


def _details_generic(raw: dict[str, Any]) -> str:
    out = []
    for key, value in raw.items():
        if isinstance(value, list):
            value = ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, separators=(", ", ": "))
        out.append(f"- `{key}`: {value}")
    return "\n".join(out)


def details(results: list[ScenarioResult]) -> str:
    parts = []
    for res in results:
        if not res.raw:
            continue
        if res.name in ("sync_invoke", "fusion_chain"):  # wrk points per server (or setup), then anything else
            body = _details_sync(res.raw)
            rest = {k: v for k, v in res.raw.items() if not isinstance(v, dict)}
            if rest:
                body += "\n\n" + _details_generic(rest)
        else:
            body = _details_generic(res.raw)
        load = ""
        if res.loadavg.get("before") and res.loadavg.get("after"):
            load = f", 1-min load average {res.loadavg['before'][0]:g} -> {res.loadavg['after'][0]:g}"
        parts.append(f"### {res.title} (`{res.name}`, {res.took_s:.0f} s{load})\n\n{body}")
    return "\n\n".join(parts)


def machine_section(machine: dict[str, Any], when: str, load: dict[str, Any]) -> str:
    pk = machine.get("packages", {})
    before, after = load["before"], load["after"]
    return "\n".join([
        f"- CPU: {machine['cpu_model']}, {machine['cores']} cores ({machine['cores_usable']} usable by the benchmark)",
        f"- Memory: {machine['memory_gib']} GiB",
        f"- OS: {machine['os']}, kernel {machine['kernel']}",
        f"- Python {machine['python']} (`{machine['python_executable']}`)",
        f"- Load generator: {machine['wrk']}; sandbox: bubblewrap {machine['bwrap']}"
        + (f"; Celery's broker: {machine['redis_server']}" if machine.get("redis_server") else ""),
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- Date: {when}",
        f"- Machine load (the machine is shared; other work adds noise): before the run load average"
        f" {', '.join(map(str, before['loadavg']))}, {before['cpu_busy'] * 100:.0f} % of the CPUs busy over 1 s;"
        f" after it {', '.join(map(str, after['loadavg']))}, {after['cpu_busy'] * 100:.0f} % busy",
    ])


def existing_tried(path: Path) -> str | None:
    """The hand-written "What we tried" text of an existing BENCHMARKS.md, if any."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find(TRIED_START), text.find(TRIED_END)
    if start < 0 or end < start:
        return None
    return text[start + len(TRIED_START):end].strip("\n") + "\n"


def _shown_path(path: str) -> str:
    """Paths inside the repository relative to it (the report is committed; the JSON is not)."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def markdown(doc: dict[str, Any], results: list[ScenarioResult], tried: str | None) -> str:
    opts = doc["options"]
    flagged = [r.metric for res in results for r in res.rows if r.flagged]
    failed = [res.title for res in results if res.status == "failed"]
    leftovers = doc["cleanup"]["leftovers"]
    mode = "quick (smoke) run" if opts["quick"] else "full run"
    head = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python -m tests.bench`), {mode}, {doc['finished_at']}. Every baseline",
        "was measured in the same run, on the same machine (below); ratios are nuclide / baseline.",
        "These are figures, not pass/fail tests: nothing here asserts a timing.",
        f"Durations: {opts['duration_s']} s per throughput point after a {opts['warmup_s']} s warm-up;"
        f" {opts['repeats']} repetitions per cold start figure; {opts['functions']} functions for density"
        + (f"; {opts['calls']:,} calls per async throughput run." if "calls" in opts else "."),
        f"Raw figures: `{_shown_path(doc['json_path'])}`.",
        "",
    ]
    if flagged:
        head += [f"> ⚠ **Some measurements had errors** (non-2xx responses or socket errors): "
                 f"{', '.join(flagged)}. Their figures are not comparable until that is fixed.", ""]
    if failed:
        head += [f"> ⚠ **Scenarios that failed**: {', '.join(failed)} (see the table and the JSON).", ""]
    disturbed = [r.metric for res in results for r in res.rows if "DISTURBED" in r.notes]
    if disturbed:
        head += [f"> ⚠ **Other work shared the machine during**: {', '.join(dict.fromkeys(disturbed))}"
                 " (see the notes); those figures are noisier than the others.", ""]
    if leftovers:
        head += [f"> ⚠ **{len(leftovers)} process(es) were still running at the end** and were killed: "
                 + ", ".join(f"{p['pid']} {p['what']}" for p in leftovers), ""]
    return "\n".join(head + [
        "## Results",
        "",
        results_table(results),
        "",
        "## How these were measured",
        "",
        NOTES,
        "## Machine",
        "",
        machine_section(doc["machine"], doc["finished_at"], doc["load"]),
        "",
        "## Details",
        "",
        details(results),
        "",
        "## What we tried",
        "",
        TRIED_START,
        (tried or TRIED_DEFAULT).rstrip("\n"),
        TRIED_END,
        "",
    ])


def results_from_json(doc: dict[str, Any]) -> list[ScenarioResult]:
    """The scenario results of a JSON document this package wrote (to render it again)."""
    results = []
    for sc in doc["scenarios"].values():
        rows = []
        for r in sc["rows"]:
            target = Target(**r["target"]) if r.get("target") else None
            rows.append(Row(r["scenario"], r["metric"], r["unit"], r["nuclide"], r["baseline"], r["baseline_label"],
                            target, r["notes"], r["errors"], r["status"], r.get("pending_on", "")))
        results.append(ScenarioResult(sc["name"], sc["title"], sc["status"], rows, sc.get("raw") or {},
                                      sc.get("error", ""), sc.get("took_s", 0.0), sc.get("loadavg") or {}))
    return results


def console_table(results: list[ScenarioResult]) -> str:
    """A plain-text version of the results table for the terminal."""
    rows = [["scenario", "nuclide", "baseline", "ratio", "target", "met?"]]
    for res in results:
        if res.status in ("failed", "skipped"):
            rows.append([f"{res.title}: {res.status.upper()}", "", "", "", "", ""])
        for row in res.rows:
            cells = _row_cells(row)
            rows.append([cells[0], cells[1], cells[2].split(" (")[0], cells[3], cells[4], cells[5]])
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
