"""``python -m tests.bench`` (what ``make bench`` runs): every scenario, then BENCHMARKS.md and the JSON.

Outputs, unless ``--out`` says otherwise: ``bench-results/bench-<timestamp>.json``
and, for a full run of every scenario, ``BENCHMARKS.md`` at the repository root
(a ``--quick`` or ``--only`` run writes ``bench-results/bench-<timestamp>.md``
instead, so it never replaces the real figures). ``--out DIR`` writes
``DIR/bench-<timestamp>.json`` and ``DIR/BENCHMARKS.md``; ``--out FILE.json``
writes that file and ``FILE.md`` beside it.

Exit status: 0 when every scenario ran (rows with failed requests are flagged in
the report, not here), 1 when a scenario failed or a process had to be killed at
the end, 2 on bad usage or a missing tool (wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.bench import report, wrk
from tests.bench.harness import ROOT, Bench, Options
from tests.bench.machine import load_snapshot, machine_info
from tests.bench.procs import become_subreaper
from tests.bench.model import PENDING, Row, ScenarioResult
from tests.bench.registry import Scenario, load_all

MISSING_TOOLS = {"wrk": wrk.MISSING_WRK}


def parse_args(argv: list[str] | None, names: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmarks of nuclide against baselines measured in the same run (issue 6).",
        epilog=f"scenarios: {', '.join(names)}",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per scenario (CI smoke): 1 s points, 5 functions, 2 repetitions,"
                             " 300 async calls")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=(), help="run only these scenarios")
    parser.add_argument("--duration", type=int, metavar="S", help="seconds per throughput point (default 5)")
    parser.add_argument("--warmup", type=int, metavar="S", help="seconds of warm-up before measuring (default 2)")
    parser.add_argument("--functions", type=int, metavar="M", help="functions deployed for density (default 100)")
    parser.add_argument("--repeats", type=int, metavar="N", help="repetitions per cold start figure (default 5)")
    parser.add_argument("--calls", type=int, metavar="N",
                        help="async calls per measured run, for nuclide and for Celery (default 5000)")
    parser.add_argument("--retries", type=int, metavar="N",
                        help="measure a throughput point again when other work used over 10 %% of the CPUs"
                             " meanwhile (default 2; 0 with --quick)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="a directory, or a .json file, for the results")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: write the markdown of an earlier run's JSON again (to its"
                             " markdown_path, or beside --out)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory (logs) for debugging")
    args = parser.parse_args(argv)
    opts = Options.quick_defaults() if args.quick else Options()
    for attr, value in (("duration_s", args.duration), ("warmup_s", args.warmup), ("functions", args.functions),
                        ("repeats", args.repeats), ("calls", args.calls), ("retries", args.retries)):
        if value is not None:
            if value < (0 if attr == "retries" else 1):
                parser.error(f"--{attr.split('_')[0]} must be at least 1")
            setattr(opts, attr, value)
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(names)}")
    opts.only = tuple(args.only)
    opts.out = args.out
    opts.keep = args.keep
    opts.render = args.render
    return opts


def output_paths(opts: Options, stamp: str) -> tuple[Path, Path]:
    if opts.out is not None:
        if opts.out.suffix == ".json":
            return opts.out, opts.out.with_suffix(".md")
        return opts.out / f"bench-{stamp}.json", opts.out / "BENCHMARKS.md"
    results = ROOT / "bench-results"
    if opts.quick or opts.only:
        return results / f"bench-{stamp}.json", results / f"bench-{stamp}.md"
    return results / f"bench-{stamp}.json", ROOT / "BENCHMARKS.md"


def pending_result(sc: Scenario) -> ScenarioResult:
    rows = [Row(sc.name, metric, unit, target=target, status=status, pending_on=sc.pending_on,
                notes=f"pending: {sc.pending_on}") for metric, unit, target, status in sc.pending_rows]
    return ScenarioResult(sc.name, sc.title, PENDING, rows)


def _interrupt(signum: int, frame: Any) -> None:
    # unwind through every finally block, so the servers and stacks started so far are stopped
    raise KeyboardInterrupt(f"signal {signum}")


def render(opts: Options) -> int:
    """Write the markdown of an earlier run again, from its JSON (the report's text may have changed)."""
    assert opts.render is not None
    doc = json.loads(opts.render.read_text())
    md_path = Path(doc["markdown_path"]) if opts.out is None else output_paths(opts, "render")[1]
    tried = report.existing_tried(md_path) or report.existing_tried(ROOT / "BENCHMARKS.md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report.markdown(doc, report.results_from_json(doc), tried))
    print(f"wrote {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    scenarios = load_all()
    opts = parse_args(argv, list(scenarios))
    if opts.render is not None:
        return render(opts)
    selected = [sc for sc in scenarios.values() if not opts.only or sc.name in opts.only]
    for sc in selected:
        for tool in sc.needs:
            if shutil.which(tool) is None:
                print(f"nuclide bench: scenario '{sc.name}' needs {tool}, which is missing.\n"
                      f"{MISSING_TOOLS.get(tool, f'install {tool}')}", file=sys.stderr)
                return 2

    signal.signal(signal.SIGTERM, _interrupt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started_at = datetime.now(timezone.utc)
    work_dir = Path(tempfile.mkdtemp(prefix="nuclide-bench-"))
    bench = Bench(opts, work_dir)
    bench.procs.subreaper = become_subreaper()
    load_before = load_snapshot()  # the machine is shared: say how busy it was
    bench.log(f"machine before the run: load average {load_before['loadavg']}, "
              f"{load_before['cpu_busy'] * 100:.0f} % of the CPUs busy")
    results: list[ScenarioResult] = []
    interrupted = False
    try:
        for sc in selected:
            if sc.is_pending:
                results.append(pending_result(sc))
                continue
            bench.log(f"=== {sc.name}: {sc.title}")
            res = ScenarioResult(sc.name, sc.title, "ok")
            res.loadavg["before"] = [round(v, 2) for v in os.getloadavg()]
            t0 = time.monotonic()
            try:
                sc.run(bench, res)
            except KeyboardInterrupt:
                res.status, res.error = "failed", "interrupted"
                interrupted = True
                raise
            except Exception as exc:
                res.status = "failed"
                # the message first (the report's table shows the first line), then the traceback
                res.error = "".join(traceback.format_exception_only(exc)).strip() + "\n\n" + "".join(
                    traceback.format_exception(exc))
                bench.log(f"{sc.name} FAILED: {res.error}")
            finally:
                res.took_s = time.monotonic() - t0
                res.loadavg["after"] = [round(v, 2) for v in os.getloadavg()]
                results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        bench.log("interrupted: stopping what was started and writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup, whatever comes
        leftovers = bench.procs.sweep()
        if leftovers:
            bench.log(f"killed {len(leftovers)} process(es) still running at the end: {leftovers}")
        if opts.keep:
            bench.log(f"work directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    json_path, md_path = output_paths(opts, stamp)
    doc = {
        "schema": 1,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "interrupted": interrupted,
        "options": opts.to_json(),
        "machine": machine_info(),
        "load": {"before": load_before, "after": load_snapshot()},
        "scenarios": {res.name: res.to_json() for res in results},
        "rows": [row.to_json() for res in results for row in res.rows],
        "flagged": any(row.flagged for res in results for row in res.rows),
        "cleanup": {"subreaper": bench.procs.subreaper, "processes_started": len(bench.procs.started),
                    "leftovers": leftovers},
        "json_path": str(json_path),
        "markdown_path": str(md_path),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    tried = report.existing_tried(md_path) or report.existing_tried(ROOT / "BENCHMARKS.md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report.markdown(doc, results, tried))

    print(report.console_table(results))
    if doc["flagged"]:
        print("\n!! some measurements had errors (non-2xx or socket errors): see the flagged rows")
    print(f"\nwrote {md_path}\nwrote {json_path}")
    failed = [res.name for res in results if res.status == "failed"]
    if failed:
        print(f"failed scenarios: {', '.join(failed)}", file=sys.stderr)
    return 1 if (failed or leftovers or interrupted) else 0


if __name__ == "__main__":
    sys.exit(main())
