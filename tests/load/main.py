"""``python -m tests.load``: parse the options, find (or start) the stack, send, wait, report. See __init__.py."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx

from shared.config import is_loopback
from shared.procs import alive as _alive
from tests.load import report, send, track

MAX_COUNT = 200_000
MAX_PUB_COUNT = track.LIST_LIMIT  # pub calls are found by listing, which cannot page
MAX_SECONDS = 3600.0
DEFAULT_COUNT = 1000
DEFAULT_DURATION_S = 60.0
DEFAULT_WAIT_S = 120.0
DEFAULT_STALL_S = 15.0
DEFAULT_TOPIC = "nuclide-load"
NOOP_FUNCTION = "load-noop"
TOPIC_FUNCTION = "load-topic"
NOOP_SOURCE = "def handler(context, event):\n    return ''\n"
INSTANCE_EXIT_TIMEOUT_S = 10.0


class LoadError(Exception):
    """A one-line reason the run cannot happen (exit 2)."""


@dataclass
class Target:
    url: str
    token: str | None
    pull: str
    sub: str
    function: str
    topic: str | None
    self_contained: bool


# ----- options ---------------------------------------------------------------------------


def _number(kind: type, low: float, high: float, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must be between {low:g} and {high:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.load",
        description="Load-test nuclide's async invocation (ZeroMQ PUSH, ZeroMQ PUB topics, HTTP async) on this"
        " machine and report accepted, completed, failed, lost, throughput and latency.",
        epilog="Sending stops at --count or --duration, whichever comes first (default: 1000 calls, 60 s);"
        " then the run waits up to --wait s for the calls to finish. Loopback targets only.")
    p.add_argument("--mode", choices=("push", "pub", "http"), default="push", help="how to send (default push)")
    p.add_argument("--rate", type=_number(float, 0, 1_000_000, "a number"), default=0.0, metavar="N",
                   help="calls per second; 0 = as fast as possible (default)")
    p.add_argument("--count", type=_number(int, 1, MAX_COUNT, "a whole number"), metavar="N",
                   help=f"calls to send (default {DEFAULT_COUNT} unless only --duration is given; at most {MAX_COUNT},"
                   f" {MAX_PUB_COUNT} for pub)")
    p.add_argument("--duration", type=_number(float, 0.001, MAX_SECONDS, "a number of seconds"), metavar="S",
                   help=f"seconds of sending at most (default {DEFAULT_DURATION_S:g})")
    p.add_argument("--wait", type=_number(float, 0, MAX_SECONDS, "a number of seconds"), default=DEFAULT_WAIT_S,
                   metavar="S", help=f"seconds to wait for the calls to finish (default {DEFAULT_WAIT_S:g})")
    p.add_argument("--stall", type=_number(float, 0.5, MAX_SECONDS, "a number of seconds"), default=DEFAULT_STALL_S,
                   metavar="S", help="stop waiting once no call has finished for S seconds"
                   f" (default {DEFAULT_STALL_S:g})")
    p.add_argument("--concurrency", type=_number(int, 1, 1024, "a whole number"), default=64, metavar="N",
                   help="http mode: requests in flight at most (default 64)")
    p.add_argument("--self-contained", action="store_true",
                   help="start a throwaway stack in a temp dir, deploy a no-op function, run, tear it all down")
    p.add_argument("--keep", action="store_true", help="with --self-contained: keep its temp dir (service logs)")
    p.add_argument("--function", metavar="NAME", help="an existing function to load (not with --self-contained)")
    p.add_argument("--topic", metavar="T", help="pub mode: the topic to publish on (default: the function's topic"
                   " trigger)")
    p.add_argument("--url", help="the stack's URL (env NUCLIDE_URL, then the CLI's current stack)")
    p.add_argument("--token", help="API token (env NUCLIDE_TOKEN, then the one the CLI recorded for the URL)")
    p.add_argument("--pull", metavar="ENDPOINT", help="the gateway's PULL ingress (default: its gateway_pull setting)")
    p.add_argument("--sub", metavar="ENDPOINT", help="the gateway's SUB ingress (default: its gateway_sub setting)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON to PATH")
    return p


def plan_from(args: argparse.Namespace) -> send.Plan:
    count = args.count
    if count is None:
        # --duration alone means "for that long", bounded by the hard cap; neither means the default count
        count = (MAX_PUB_COUNT if args.mode == "pub" else MAX_COUNT) if args.duration is not None else DEFAULT_COUNT
    if args.mode == "pub" and count > MAX_PUB_COUNT:
        raise LoadError(f"pub mode counts at most {MAX_PUB_COUNT} calls per run (topic calls are found by listing"
                        f" GET /calls, which returns at most {MAX_PUB_COUNT} and cannot page); lower --count")
    return send.Plan(count=count, rate=args.rate, duration_s=args.duration or DEFAULT_DURATION_S)


# ----- loopback only --------------------------------------------------------------------------


def check_url(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        raise LoadError(f"refusing to load {url}: the load generator targets this machine only (127.0.0.1);"
                        " run it on the host of the stack")
    return url


def check_endpoint(endpoint: str, flag: str) -> str:
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        if is_loopback(host):
            return endpoint
    raise LoadError(f"refusing {flag} {endpoint}: the load generator targets this machine only"
                    " (tcp://127.0.0.1:PORT or ipc://)")


# ----- targets -----------------------------------------------------------------------------------


def _topic_of(fn: dict[str, Any]) -> str | None:
    topics = [((t.get("attributes") or {}).get("topic")) for t in (fn.get("spec") or {}).get("triggers") or ()
              if isinstance(t, dict) and t.get("kind") == "topic"]
    topics = [t for t in topics if isinstance(t, str) and t]
    if len(topics) != 1:
        return None
    return topics[0]


def running_target(args: argparse.Namespace) -> Target:
    """A running stack: URL and token like the CLI's, endpoints from flags or the gateway's settings."""
    from services.cli.client import CliError, unauthorized
    from services.cli.stacks import resolve_target
    from shared.config import ConfigError, load_settings

    if not args.function:
        raise LoadError("say what to load: --self-contained starts a throwaway stack with a no-op function, or"
                        " --function NAME loads a function of the running stack (--url, --token)")
    try:
        resolved = resolve_target(args.url, args.token)
    except CliError as exc:
        raise LoadError(exc.message) from None
    url = check_url(resolved.url)
    pull, sub = args.pull, args.sub
    if not pull or not sub:
        try:
            settings = load_settings("gateway")
        except ConfigError as exc:
            raise LoadError(f"cannot read the gateway's settings for its ingress endpoints ({exc}); pass --pull"
                            " and --sub") from None
        pull, sub = pull or settings.gateway_pull, sub or settings.gateway_sub
    pull, sub = check_endpoint(pull, "--pull"), check_endpoint(sub, "--sub")
    headers = {"Authorization": f"Bearer {resolved.token}"} if resolved.token else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=5.0, trust_env=False) as client:
            health = client.get("/healthz")
            if health.status_code != 200:
                raise LoadError(f"nuclide at {url} is not healthy (HTTP {health.status_code}: {health.text[:200]})")
            resp = client.get(f"/functions/{args.function}")
    except httpx.HTTPError as exc:
        raise LoadError(f"cannot reach nuclide at {url} ({type(exc).__name__}): is `nuclide up` running?") from None
    if resp.status_code == 401:
        raise LoadError(f"{unauthorized(resolved)} (the run reads call records)")
    if resp.status_code == 404:
        raise LoadError(f"function '{args.function}' not found at {url}; deploy it, or use --self-contained")
    if resp.status_code != 200:
        raise LoadError(f"GET /functions/{args.function} answered HTTP {resp.status_code}: {resp.text[:200]}")
    topic = args.topic
    if args.mode == "pub" and not topic:
        topic = _topic_of(resp.json())
        if not topic:
            raise LoadError(f"'{args.function}' has no single topic trigger; pass --topic T")
    return Target(url, resolved.token, pull, sub, args.function, topic, False)


def _deploy(stack: Any, name: str, **spec: Any) -> None:
    from tests.stack import function_yaml, make_zip

    resp = stack.client.put(f"/{name}", files={"zip_file": ("f.zip", make_zip(
        {"function.yaml": function_yaml(name, **spec), "main.py": NOOP_SOURCE}), "application/zip")})
    if resp.status_code != 200:
        raise LoadError(f"deploying {name} on the self-contained stack failed: HTTP {resp.status_code}"
                        f" {resp.text[:300]}")


@contextlib.contextmanager
def own_stack(args: argparse.Namespace) -> Iterator[Target]:
    """A throwaway stack (tests/stack.py) in a temp dir with the no-op function(s); always torn down."""
    from tests.stack import Stack

    work = Path(tempfile.mkdtemp(prefix="nuclide-load-"))
    stack = Stack(work / "var")
    instances: list[int] = []
    try:
        print(f"starting a self-contained stack in {work} ...", file=sys.stderr, flush=True)
        try:
            stack.start()
        except AssertionError as exc:
            raise LoadError(f"the self-contained stack did not start: {str(exc).splitlines()[0]}") from None
        if args.mode == "pub":
            _deploy(stack, TOPIC_FUNCTION, triggers={"load": {"kind": "topic", "attributes": {"topic": DEFAULT_TOPIC}}})
            function, topic = TOPIC_FUNCTION, DEFAULT_TOPIC
        else:
            _deploy(stack, NOOP_FUNCTION)
            function, topic = NOOP_FUNCTION, None
        with contextlib.suppress(OSError, ValueError, KeyError):
            instances = stack.instance_pids()
        yield Target(stack.url, stack.token, stack.endpoints["gateway_pull"], stack.endpoints["gateway_sub"],
                     function, topic, True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the teardown whatever comes
        with contextlib.suppress(OSError, ValueError, KeyError):
            instances = sorted(set(instances) | set(stack.instance_pids()))
        stack.stop()  # the deployer stops its instances on exit (NUCLIDE_DEPLOYER_STOP_INSTANCES_ON_EXIT)
        for proc in stack.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _reap_instances(instances)
        if args.keep:
            print(f"kept {work} (service logs: {work / 'var'}/*.service.log)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _reap_instances(pids: list[int]) -> None:
    """Instances of our own stack outliving it (they should not): wait a little, then kill them by pid."""
    deadline = time.monotonic() + INSTANCE_EXIT_TIMEOUT_S
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            print(f"warning: instance {pid} outlived the self-contained stack; killing it", file=sys.stderr)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ----- the run -------------------------------------------------------------------------------------


def run(target: Target, args: argparse.Namespace, plan: send.Plan) -> report.Result:
    run_id = f"load-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    rate = "max" if not plan.rate else f"{plan.rate:g}/s"
    print(f"sending up to {plan.count} calls ({args.mode}, rate {rate}, at most {plan.duration_s:g} s) to"
          f" {target.function} ...", file=sys.stderr, flush=True)
    if args.mode == "push":
        sent = send.send_push(target.pull, target.function, plan, run_id)
    elif args.mode == "pub":
        assert target.topic is not None
        sent = send.send_pub(target.sub, target.topic, plan, run_id)
    else:
        sent = send.send_http(target.url, target.token, target.function, plan, run_id, args.concurrency)
    print(f"sent {sent.sent}, accepted {sent.accepted}; waiting up to {args.wait:g} s for them to finish ...",
          file=sys.stderr, flush=True)
    if args.mode == "pub":
        tracked = track.track_listing(target.url, target.token, target.function, sent.first_send, sent.accepted,
                                      args.wait, args.stall)
    else:
        tracked = track.track_ids(target.url, target.token, sent.ids, args.wait, args.stall)
    plan_doc = {"count": plan.count, "rate": plan.rate, "duration_s": plan.duration_s, "wait_s": args.wait,
                "stall_s": args.stall, "run": run_id, "topic": target.topic,
                "endpoint": {"push": target.pull, "pub": target.sub, "http": target.url}[args.mode]}
    return report.summarise(args.mode, target.function, target.url, target.self_contained, plan_doc, sent, tracked)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # tear the self-contained stack down on SIGTERM too
    try:
        if args.self_contained:
            clash = [f for f in ("function", "url", "token", "pull", "sub", "topic") if getattr(args, f)]
            if clash:
                raise LoadError(f"--self-contained starts its own stack and function; drop --{clash[0]}")
        elif args.keep:
            raise LoadError("--keep only applies to --self-contained")
        plan = plan_from(args)
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(own_stack(args)) if args.self_contained else running_target(args)
            result = run(target, args, plan)
            # print before the teardown, so the numbers never wait on it
            print(report.render(result), flush=True)
            if args.json:
                report.write_json(result, args.json)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except track.TrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1 if result.lost_is_failure else 0
