"""The nuclide command line: `nuclide up` and the API commands."""

from __future__ import annotations

import argparse
import sys

from shared.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nuclide")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole stack in the foreground")
    opts = parser.parse_args(argv)
    if opts.command == "up":
        from services.cli.up import run

        try:
            settings = load_settings("up")
        except ConfigError as exc:
            print(f"nuclide: {exc}", file=sys.stderr)
            return 2
        return run(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
