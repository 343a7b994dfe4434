"""A container's network: none of the host's, a user-mode one of its own (slirp4netns), the instance link.

An isolated container (``spec.network: isolated``, the default) is created with Docker's network mode
``none``: a network namespace of its own with a loopback only. Once it runs, :func:`attach` starts
slirp4netns on that namespace with host loopback disabled, so outbound connections leave through it
while nothing listening on the host's loopback (the platform's sockets, every local service) can be
reached, as for a process-backend instance. No bridge and no address of the host's networks is used
(dockerd runs with ``--bridge=none`` on the machines nuclide targets). The instance reaches the gateway
over the instance link: the directory of the gateway's unix socket, bind-mounted read-only into the
container at :data:`LINK_DIR`.

slirp4netns lives as long as the container: its ``--exit-fd`` is a pipe whose only write end is held by
``tail --pid`` of the container's first process, so both exit with the container, and a deployer (or
runner) that restarts leaves them serving their container. Stdlib only: the runner imports it too.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

LINK_DIR = "/run/nuclide/link"  # the instance link's directory inside a container
# the user-mode network, as on the process backend (services/deployer/netns.py): outside every private range
CIDR = "100.64.255.0/24"
DNS = "100.64.255.3"  # slirp4netns's DNS forwarder: the container's resolver (the host's may be on its loopback)
MTU = 65520
READY_TIMEOUT_S = 10.0
WATCH_INTERVAL_S = "0.5"  # how often tail looks for the container's first process


class NoUserNet(OSError):
    """slirp4netns could not be attached to a container's namespace."""


def link_endpoint(host_link: str) -> str:
    """The gateway's instance link (``ipc://<dir>/<name>`` on the host) as a container reaches it."""
    return f"ipc://{LINK_DIR}/{Path(host_link[len('ipc://'):]).name}"


def network_options(isolated: bool, link_source: str) -> dict:
    """Docker HostConfig arguments: network mode ``none`` and the link's directory bound read-only (isolated),
    or the host's network (the opt-in). ``link_source``: a host directory or a volume's name."""
    if not isolated:
        return {"network_mode": "host"}
    return {"network_mode": "none", "dns": [DNS], "binds": {link_source: {"bind": LINK_DIR, "mode": "ro"}}}


def attach(pid: int, log_path: Path) -> int:
    """Give the network namespace of process ``pid`` (a container's first process, as this host sees it) a way
    out through slirp4netns with host loopback disabled; returns slirp4netns's pid. Blocking (about 10 ms);
    raises NoUserNet saying why."""
    slirp, tail = shutil.which("slirp4netns"), shutil.which("tail")
    if slirp is None or tail is None:
        raise NoUserNet(0, "slirp4netns is not installed (apt-get install slirp4netns)")
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                # seccomp, not --enable-sandbox: the sandbox's mount namespace, a copy of the host's, stops the
                # Engine's archive API (how a runtime pool container gets its code) from reaching the code
                # volume of any container that ran when it started (the upload succeeds, the files are not there)
                [slirp, "--configure", f"--mtu={MTU}", f"--cidr={CIDR}", "--disable-host-loopback",
                 "--enable-seccomp", "--ready-fd", str(ready_w), "--exit-fd", str(exit_r),
                 str(pid), "tap0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(ready_w, exit_r), start_new_session=True)
            # the exit pipe's write end lives in tail alone, which exits with the container's first process
            subprocess.Popen([tail, "-s", WATCH_INTERVAL_S, f"--pid={pid}", "-f", "/dev/null"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, pass_fds=(exit_w,),
                             start_new_session=True)
    except OSError as exc:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        raise NoUserNet(exc.errno, f"could not start slirp4netns: {exc}") from None
    for fd in (ready_w, exit_r, exit_w):
        os.close(fd)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([ready_r], [], [], max(0.0, remaining))
            if readable:
                if os.read(ready_r, 1):
                    return proc.pid
                break  # EOF: it exited
            if remaining <= 0:
                break
    finally:
        os.close(ready_r)
    proc.kill()
    raise NoUserNet(0, f"slirp4netns did not come up for process {pid} (see {log_path})")
