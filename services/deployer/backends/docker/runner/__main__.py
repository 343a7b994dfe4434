"""``python -m services.deployer.backends.docker.runner <config.json> | --spare [docker-host]``: a runner.

Exit codes: 0 stopped, 3 the warm container could not start (the function failed to load).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from shared.exits import EXIT_INIT_FAILED
from services.deployer.backends.docker.runner import MODULE, SPARE_ARG
from services.deployer.backends.docker.runner.driver import CallContainers, engine_client
from services.deployer.backends.docker.runner.wire import Runner

SPARE_MAX_CONCURRENCY = 28  # the connection pool a spare's client is made with (more calls: a client of their own)


def serve(config: dict[str, Any], api: Any = None) -> int:
    containers = CallContainers(config, api)
    runner = Runner(config, containers)
    try:
        try:
            runner.prepare()
        except Exception as exc:
            print(f"nuclide: function failed to load: {exc}", file=sys.stderr, flush=True)
            return EXIT_INIT_FAILED
        return runner.run()
    finally:
        runner.close()


def spare_main(docker_host: str) -> int:
    """A spare runner: a runner's imports done, it waits for the path of its config on stdin (the deployer's
    pipe), so a start pays neither the interpreter's start nor the imports. Its output goes to the config's
    ``log_path`` from then on. EOF before a path: the deployer stopped or died; nothing to serve.
    ``docker_host``: its Engine API client is made (and the API version agreed) ahead too."""
    import docker.errors  # noqa: F401 (what CallContainers and Runner import: loaded before a start needs them)
    import zmq  # noqa: F401

    from shared import instanceloop, liveness, protocol  # noqa: F401

    api = None
    try:
        api = engine_client(docker_host, SPARE_MAX_CONCURRENCY) if docker_host else None
    except Exception as exc:  # the engine is away now: the runner makes its client once it has a config
        print(f"nuclide: spare runner: no Engine API client yet: {exc}", file=sys.stderr, flush=True)
    line = sys.stdin.buffer.readline().strip()
    if not line:
        return 0
    with open(line.decode()) as fh:
        config = json.load(fh)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(config["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null_fd, 0), (log_fd, 1), (log_fd, 2)):
        os.dup2(fd, target)
    os.close(log_fd)
    os.close(null_fd)
    fits = config["docker_host"] == docker_host and int(config["max_concurrency"]) <= SPARE_MAX_CONCURRENCY
    if api is not None and not fits:
        api.close()
        api = None
    return serve(config, api)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == SPARE_ARG:
        return spare_main(argv[2] if len(argv) > 2 else "")
    if len(argv) != 2:
        print(f"usage: python -m {MODULE} <runner-config.json> | {SPARE_ARG} [docker-host]",
              file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        config = json.load(fh)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
