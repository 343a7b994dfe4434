"""`make mutate`: mutmut over the modules that hold nuclide's guarantees, each with the tests that guard it.

    python -m tests.mutate                 # every group
    python -m tests.mutate archive auth    # some groups

Each group runs in a copy of the tracked files below /var/tmp (mutmut writes a mutants/ tree next to
the code it mutates, and reads its settings from setup.cfg there), so the checkout stays clean. Prints
per group the mutants, killed, survived, and the names of the survivors with `mutmut show` for each;
exits 1 when any mutant survived. Slow (minutes per group), so not part of `make test` or CI.

mutmut decides which tests to run for a mutant from the tests that executed its function in-process:
groups whose code runs only inside service processes (the gateway's async paths) are guarded by the
integration tests, which mutmut cannot attribute, so such a group reports its mutants as "no tests".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# group -> (files mutated, pytest arguments that select the tests guarding them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "archive": (["shared/archive.py"], ["tests/unit/test_archive.py"]),
    "auth": (["shared/auth.py"], ["tests/unit/test_auth.py", "tests/unit/test_config.py"]),
    "store-calls": (["services/store/durable_calls.py"],
                    ["tests/unit/test_store_calls.py", "tests/unit/test_store_state.py",
                     "tests/unit/test_store_gateways.py"]),
    "broker": (["services/gateway/broker.py"],
               ["tests/unit/test_broker.py", "tests/unit/test_broker_vanished.py",
                "tests/unit/test_broker_keys.py", "tests/unit/test_gateway_routing.py"]),
    "sandbox": (["services/deployer/sandbox.py"], ["tests/unit/test_sandbox.py"]),
    "async": (["services/gateway/async_calls.py"], ["tests/integration/test_async.py", "tests/integration/test_readme_claims.py"]),
}


def run_group(name: str, keep: bool) -> tuple[dict[str, int], list[str]]:
    files, tests = GROUPS[name]
    work = Path(tempfile.mkdtemp(prefix=f"nuclide-mutate-{name}-", dir="/var/tmp"))
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    lines = ["[mutmut]", "source_paths=", "    shared", "    services", "only_mutate="]
    lines += [f"    {f}" for f in files]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args=", "    -p", "    no:cacheprovider", "    -q"]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")
    mutmut = [sys.executable, "-m", "mutmut"]
    # a mutant that breaks a reply makes a test wait out its deadline: shorter ones keep a group within minutes
    env = {**os.environ, "NUCLIDE_TEST_WAIT_S": "2"}
    run = subprocess.run([*mutmut, "run"], cwd=work, capture_output=True, text=True, env=env)
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True)
    counts: dict[str, int] = {}
    survivors: list[str] = []
    for line in results.stdout.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if not m:
            continue
        status = m.group(2).strip()
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            show = subprocess.run([*mutmut, "show", m.group(1)], cwd=work, capture_output=True, text=True)
            survivors.append(f"{m.group(1)}\n{show.stdout.strip()}")
    if not counts:
        print(f"{name}: mutmut ran no mutant; its output:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"{name}: kept {work}")
    return counts, survivors


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--keep", action="store_true", help="keep each group's working copy (mutmut browse there)")
    opts = parser.parse_args()
    unknown = [g for g in opts.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    any_survived = False
    for name in opts.groups or list(GROUPS):
        counts, survivors = run_group(name, opts.keep)
        total = sum(counts.values())
        print(f"{name}: {total} mutants, {counts.get('killed', 0)} killed, {counts.get('survived', 0)} survived, "
              + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "survived")), flush=True)
        for survivor in survivors:
            print(f"  survived: {survivor}\n")
        any_survived = any_survived or bool(survivors)
    sys.exit(1 if any_survived else 0)


if __name__ == "__main__":
    main()
