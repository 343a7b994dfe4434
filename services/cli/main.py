"""The nuclide command line: `nuclide up`, the stacks it knows (`login`, `stacks`) and the API commands."""

from __future__ import annotations

import argparse
import os
import sys

from shared.config import ConfigError, load_settings

API_COMMANDS = ("deploy", "invoke", "get", "list", "delete", "logs", "calls", "trace", "version", "scale")
# faas-cli's names for the same commands
ALIASES = {"describe": "get", "ls": "list", "rm": "delete", "remove": "delete"}
CALL_STATUSES = ("PENDING", "RUNNING", "DONE", "FAILED", "DEAD")
FINAL_STATUSES = ("DONE", "FAILED", "DEAD")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _port_base(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; the stack takes ports N to N+7") from None


def _connection_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--url", default=default, help="nuclide API URL (env NUCLIDE_URL; default: the current stack"
                        " of `nuclide stacks`, else http://127.0.0.1:8000)")
    parser.add_argument("--token", default=default, help="API token (env NUCLIDE_TOKEN; default: the one recorded"
                        " for the URL, see `nuclide stacks`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nuclide", description="Self-hosted serverless functions for Python.")
    _connection_flags(parser, None)
    # Subcommands repeat the flags with SUPPRESS so a value given after the subcommand wins
    # and an absent one does not overwrite a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="start the whole stack in the foreground")
    p.add_argument("--port-base", type=_port_base, metavar="N",
                   help="ports N to N+7 for HTTP and the ZeroMQ endpoints (env NUCLIDE_PORT_BASE); a port set on its"
                   " own wins")
    p.add_argument("--gateways", type=_positive_int, metavar="N",
                   help="start N gateways, each a full HTTP API with ports of its own: gateway i (from 0) at the"
                   " first one's ports plus 10*i (env NUCLIDE_GATEWAYS; default 1)")
    p.add_argument("--print-ports", action="store_true",
                   help="print the stack's ports (one `setting port` line each) and exit, starting nothing")

    p = sub.add_parser("login", parents=[common], help="record the token of the stack at --url and make it current",
                       description="Checks the token (from --token, else stdin) against the stack, then records"
                       " the URL and token for the CLI, next to other stacks'.")
    p.add_argument("--started-by", metavar="TEXT", help="what started the stack (said when its token is refused)")
    p.add_argument("--token-hint", metavar="TEXT", help="a command that prints the stack's token (said then too)")
    sub.add_parser("stacks", help="list the stacks the CLI has tokens for, and which one is current")

    p = sub.add_parser("deploy", parents=[common], help="deploy a function folder, .zip or .py file, or the functions"
                       " of a deploy file (-f)")
    p.add_argument("path", metavar="PATH", nargs="?", help="function folder, .zip package, or a single .py file")
    p.add_argument("-f", "--file", metavar="FILE", help="a deploy file (YAML) listing functions and their handler"
                   " folders, .zip or .py files, like faas-cli's stack.yml")
    p.add_argument("--name", help="function name (default: metadata.name in function.yaml, else the file name)")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="return once accepted and poll the state instead of holding the request open")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="give up waiting after S seconds (default 600)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the build's output and the function's"
                   " log lines while the deploy runs")

    p = sub.add_parser("invoke", parents=[common], help="call a function and print its response body")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-d", "--data", metavar="BODY",
                   help="request body, @FILE to read a file, @- for stdin (default: stdin when piped)")
    p.add_argument("-H", "--header", action="append", metavar="K=V", help="request header; repeatable")
    p.add_argument("-X", "--method", default="POST", metavar="METHOD", help="HTTP method (default POST)")
    p.add_argument("--content-type", metavar="CT", help="Content-Type of the body (default: guessed from it)")
    p.add_argument("-i", "--include", action="store_true", help="print status, call id and headers to stderr")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="give up after S seconds")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="queue the call durably and print its call id (202) instead of waiting for the answer")
    p.add_argument("--callback", metavar="URL", help="with --async: POST the result to URL when the call finishes")
    p.add_argument("--idempotency-key", metavar="K",
                   help="with --async: a repeated submission with the same key returns the first call's id")
    p.add_argument("--wait", action="store_true",
                   help="with --async: poll until the call is final, then print its result (--timeout bounds it)")

    p = sub.add_parser("get", parents=[common], aliases=["describe"], help="show one function")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    p = sub.add_parser("list", parents=[common], aliases=["ls"], help="list functions")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="print the names only, one a line")

    p = sub.add_parser("delete", parents=[common], aliases=["rm", "remove"], help="delete a function")
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser("scale", parents=[common], help="hold a function's replicas at N (within its minReplicas and"
                       " maxReplicas), or give them back to the autoscaler with `auto`")
    p.add_argument("name", metavar="NAME")
    p.add_argument("replicas", metavar="N", type=_replicas_arg, help="a whole number, or auto")

    p = sub.add_parser("logs", parents=[common], help="print a function's recent log lines")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tail", type=_positive_int, default=200, metavar="N", help="last N lines (default 200)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    p.add_argument("--since", metavar="WHEN", help="only lines since a duration ago (30s, 5m, 1h30m) or an RFC 3339"
                   " time (2026-01-02T15:04:05Z)")

    _calls_parser(sub, common)

    p = sub.add_parser("trace", parents=[common], help="print the trace a call is part of: the tree of task calls,"
                       " with status, duration, fused or remote")
    p.add_argument("id", metavar="CALL_ID")
    p.add_argument("-o", "--output", choices=("tree", "json"), default="tree")

    p = sub.add_parser("version", parents=[common], help="print the CLI's version and the gateway's")
    p.add_argument("--client", action="store_true", help="the CLI's version only (no request)")
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="bash: `source <(nuclide completion bash)`, or save it as"
                       " /etc/bash_completion.d/nuclide")
    p.add_argument("shell", choices=("bash",))
    return parser


def _calls_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("calls", parents=[common], help="list calls (async ones and records of sync ones); get, result,"
                       " redrive, purge", description="Without an action: list calls, newest first.")
    p.add_argument("--function", metavar="F", help="only calls of function F")
    p.add_argument("--status", type=str.upper, choices=CALL_STATUSES, metavar="S",
                   help=f"only calls in status S ({', '.join(CALL_STATUSES)})")
    p.add_argument("--limit", type=_positive_int, default=100, metavar="N",
                   help="at most N calls (default 100; the server caps it at 1000)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    actions = p.add_subparsers(dest="calls_command", metavar="ACTION")
    a = actions.add_parser("get", parents=[common], help="show one call: status, attempts, timings, result or error")
    a.add_argument("id", metavar="ID")
    a.add_argument("-o", "--output", choices=("json", "yaml"), default="json")
    a = actions.add_parser("result", parents=[common], help="print a finished call's raw result body")
    a.add_argument("id", metavar="ID")
    a = actions.add_parser("redrive", parents=[common], help="run a DEAD call again from its first attempt")
    a.add_argument("id", metavar="ID")
    a = actions.add_parser("purge", parents=[common], help="delete the finished calls of one status")
    a.add_argument("--status", type=str.upper, choices=FINAL_STATUSES, required=True, metavar="S",
                   help=f"the status to purge ({', '.join(FINAL_STATUSES)}); DEAD purges the dead letters")
    # SUPPRESS: `nuclide calls --function F purge ...` must keep F, not reset it to "every function"
    a.add_argument("--function", metavar="F", default=argparse.SUPPRESS, help="only calls of function F")


def _replicas_arg(text: str) -> str:
    if text == "auto" or (text.isdigit() and len(text) < 6):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a replica count: give a whole number, or auto")


def run_api_command(opts: argparse.Namespace) -> int:
    from services.cli.client import Client, CliError
    from services.cli.commands import COMMANDS, Streams
    from services.cli.stacks import resolve_target

    streams = Streams.std()
    try:
        target = resolve_target(opts.url, opts.token)
        with Client(target=target) as client:
            return COMMANDS[opts.command](client, opts, streams)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The server keeps building after we hang up, so say where to look.
        hint = "; the deploy may still finish on the server: check `nuclide list`" if opts.command == "deploy" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `nuclide logs f | head` closes our stdout early; point it at devnull so the exit flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    opts.command = ALIASES.get(opts.command, opts.command)
    if opts.command == "deploy" and (opts.path is None) == (opts.file is None):
        parser.error("deploy takes a PATH or -f FILE (one of them)")
    if opts.command == "completion":
        from services.cli.completion import bash_script

        sys.stdout.write(bash_script(parser))
        return 0
    if opts.command == "version" and opts.client:
        from services.cli.commands import client_version

        print(f"nuclide {client_version()}")
        return 0
    if opts.command == "up":
        from services.cli.up import print_ports, run

        try:
            overrides: dict = {"port_base": opts.port_base} if opts.port_base is not None else {}
            if opts.gateways is not None:
                overrides["gateways"] = opts.gateways
            settings = load_settings("up", **overrides)
        except ConfigError as exc:
            print(f"nuclide: {exc}", file=sys.stderr)
            return 2
        return print_ports(settings) if opts.print_ports else run(settings)
    if opts.command in ("login", "stacks"):
        from services.cli.client import CliError
        from services.cli.stacks import cmd_login, cmd_stacks

        try:
            return cmd_login(opts) if opts.command == "login" else cmd_stacks(opts)
        except CliError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    if opts.command in API_COMMANDS:
        return run_api_command(opts)
    return 2


if __name__ == "__main__":
    sys.exit(main())
