"""The runner: an instance of a function on a registered runtime, one container command per call.

It speaks the instance protocol to the gateway (READY, INVOKE -> RESULT, HEARTBEAT, BYE) through
the Python runtime's own loop (``shared/instanceloop.py``), so routing, async calls, retries and metrics work unchanged, but it
runs on the deployer's host (the runtime image is the user's and may have no Python or ZeroMQ)
and drives the Docker Engine API. Per call, by the function's warm-start policy:

- ``none``: a fresh container of the function's image per call (created, attached, started,
  removed by the engine when it exits);
- ``runtime``: one warm container per concurrent call; each call gets a fresh copy of the code
  (and of what the ``dependencies`` command left next to it), so nothing a call writes is seen by
  the next one, then its ``run`` command is exec'ed;
- ``function``: one warm container per concurrent call with the code already in place (copied
  once at start, like a warm Lambda: files a call writes stay for the next), ``run`` exec'ed.
  Without a ``dependencies`` command no image is built for it (``code_volume``): its containers
  run the runtime's own image and the code is unpacked into their code volume from the version's
  code directory on this host (see ``box.py``); the deployer may hand over the first one,
  taken from its runtime pool and filled already (``container``).

A Python function (``kind: python``; its image is the docker backend's group image, dependencies and
code) runs the same way with ``services.runtime.once`` as the command: ``none`` starts it as the fresh
container's main process in the image's code directory; ``runtime`` copies the code directory into a
fresh tmpfs directory of a warm container and execs it there (:data:`PY_DRIVER`). It gets the INVOKE
header and body on stdin and answers with the RESULT header and body (see that module), so callers see
what a warm Python instance answers; its stderr (the handler's logs and prints) goes to this log as is.

For registered runtimes a fixed POSIX sh script (:data:`DRIVER`, never built from user input: the run
command arrives as its positional arguments) writes the call's input to ``./input.json``, runs
the command with it on stdin, and prints one status line (exit code, and whether the result is
``output.json``) before the result. The containers get the backend's lockdown (``box.py``):
read-only root, tmpfs ``/tmp`` and code directory (a tmpfs volume without an image), no
capabilities, no-new-privileges, user 65534, memory, CPU and pids limits, no host mounts. A call
past its timeout fails with 504 and its container is killed (a warm one is replaced). Exit codes:
0 stopped, 3 the warm container could not start.

``python -m services.deployer.backends.docker.runner --spare`` is a runner started ahead of need
by the deployer: its imports done, it reads the path of its config from stdin when a start takes
it (``__main__.spare_main``).

The package: ``results.py`` maps what a call's command did to its result (pure, unit tested),
``box.py`` is the containers' lockdown (the deployer's runtime pool makes the same), ``driver.py``
drives the Engine API, ``wire.py`` is the instance (its calls; the link is ``shared/instanceloop.py``),
``__main__.py`` the entry points. Its config is an instance config (``shared/instanceconfig.py``) with
the runner's own settings beside it.
"""

SPARE_ARG = "--spare"  # wait for the config's path on stdin, imports done (see __main__.spare_main)
MODULE = "services.deployer.backends.docker.runner"  # what ``python -m`` runs
