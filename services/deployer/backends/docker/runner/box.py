"""A registered runtime's warm container: its lockdown, and how its code gets in without an image build.

One place for what the runner (``driver.py``) and the deployer's runtime pool
(``services/deployer/backends/docker/runtime_pool.py``) both create, so a container is locked down the same
whoever made it: a network of its own (``usernet.py``: network mode ``none``, slirp4netns attached once it
runs, the instance link's directory read-only; the host's network with ``spec.network: host``), read-only
root, tmpfs ``/tmp``, no capabilities, no-new-privileges,
user 65534, memory (also RLIMIT_DATA), CPU and pids limits, log rotation, the image's entrypoint
replaced by an idle sh loop (:data:`WARM_MAIN`).

The code directory (the runtime's ``path``) is a tmpfs either way. Built image (a function with a
``dependencies`` command, or another policy than ``function``): a HostConfig tmpfs, filled by an
exec that copies ``/nuclide/src``. Without an image (``code_volume``): an anonymous volume of the
``local`` driver with tmpfs options, filled by the Engine's archive API (``put_archive``) with a tar
the host makes of the version's code directory. A volume, because Docker 20.10 refuses archive
uploads into a read-only root filesystem unless the target is a volume mount (a HostConfig tmpfs
is not one). It is memory, like the tmpfs it replaces (sized, uid 65534, mode 0700, nosuid,
nodev), never a host directory, and only the Engine API can reach it; it is anonymous, so it goes
with its container (``remove_container(v=True)``). Its files arrive owned by 65534 like the
copies of the image path, so a warm container's calls may change them for the next (``function``).
Only sh (and cat, rm for the calls' driver) is needed from the image: no tar, no cp.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

from services.deployer.backends.docker.runner import usernet

USER = "65534:65534"
UID = 65534
PIDS_LIMIT = 512
TMPFS_MAX_BYTES = 256 * 1024 * 1024
# a warm container's main process: idle until the container is removed (stdin stays open and silent)
WARM_MAIN = "while read _; do :; done; exec sleep 2147483647"
MAX_CODE_TAR_BYTES = 256 * 1024 * 1024  # the tmpfs would not hold more
PY_WORK_DIR = "/nuclide/work"  # a Python function's writable code directory in its container, a tmpfs
SRC_DIR = "/nuclide/src"  # a built image's copy of the code, from which each container's code directory is filled


def tmpfs_bytes(memory_bytes: int) -> int:
    """The size of /tmp and of the code directory: memory, so the container's limit caps them too."""
    return min(int(memory_bytes), TMPFS_MAX_BYTES)


def code_mount(path: str, memory_bytes: int) -> Any:
    """The code directory as an anonymous tmpfs-backed volume (the archive API can write into it)."""
    import docker.types

    options = f"size={tmpfs_bytes(memory_bytes)},uid={UID},gid={UID},mode=0700,nosuid,nodev"
    return docker.types.Mount(path, None, type="volume", driver_config=docker.types.DriverConfig(
        "local", {"type": "tmpfs", "device": "tmpfs", "o": options}))


def host_config(api: Any, path: str, memory_bytes: int, cpu: Any, auto_remove: bool, code_volume: bool, *,
                isolated: bool, link_source: str) -> Any:
    """The lockdown and limits of a registered runtime's container (``api``: a docker.APIClient). ``isolated``:
    a network of its own and the instance link from ``link_source`` (see :func:`attach_network`)."""
    import docker.types

    memory = int(memory_bytes)
    size = tmpfs_bytes(memory)
    tmpfs = {"/tmp": f"rw,noexec,nosuid,nodev,mode=1777,size={size}"}
    if not code_volume:
        tmpfs[path] = f"rw,exec,nosuid,nodev,uid={UID},gid={UID},mode=0700,size={size}"
    return api.create_host_config(
        **usernet.network_options(isolated, link_source), read_only=True, cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs=tmpfs, mounts=[code_mount(path, memory)] if code_volume else None,
        mem_limit=memory, memswap_limit=memory, nano_cpus=int(float(cpu) * 1e9) if cpu else None,
        pids_limit=PIDS_LIMIT, auto_remove=auto_remove,
        ulimits=[docker.types.Ulimit(name="data", soft=memory, hard=memory)],
        log_config=docker.types.LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
    )


def create(api: Any, image: str, argv: list[str], labels: dict[str, str], env: dict[str, str], workdir: str,
           host: Any, stdin_once: bool, name: str | None = None) -> str:
    """A container running one of our sh scripts (the image's own entrypoint is replaced); its id."""
    config = api.create_container_config(
        image, entrypoint=argv[:1], command=argv[1:], user=USER, working_dir=workdir, labels=labels,
        environment=env, stdin_open=True, host_config=host)
    config["StdinOnce"] = stdin_once  # the SDK has no argument for it: stdin closes when the caller's does
    return api.create_container_from_config(config, name=name)["Id"]


# what the engine answers when runc fails to set a container up on a busy host ("stat /bin/sh: permission
# denied" and the like): the container's process never started, so starting a new one is safe
TRANSIENT_START = "OCI runtime create failed"
START_RETRY_S = 0.2


def transient_start(exc: BaseException) -> bool:
    """Whether a container failed to start for the engine's reason, not its own (see TRANSIENT_START)."""
    return TRANSIENT_START in str(exc)


def _owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Files, directories and symlinks only, owned by the container's user, no set-id bits."""
    if not (info.isfile() or info.isdir() or info.issym()):
        return None
    info.uid = info.gid = UID
    info.uname = info.gname = ""
    if not info.issym():
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def code_tar(code_dir: str) -> bytes:
    """An uncompressed tar of a code directory's contents (relative names), for :func:`put_code`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(code_dir)):
            tar.add(os.path.join(code_dir, entry), arcname=entry, filter=_owned)
    data = buf.getvalue()
    if len(data) > MAX_CODE_TAR_BYTES:
        raise ValueError(f"the code directory {code_dir} is {len(data) >> 20} MiB as a tar; the container's code"
                         f" directory holds at most {MAX_CODE_TAR_BYTES >> 20} MiB")
    return data


def put_code(api: Any, container_id: str, path: str, data: bytes) -> None:
    """Unpack a :func:`code_tar` into a container's code volume (the Engine does it: nothing runs inside)."""
    if not api.put_archive(container_id, path, data):
        raise RuntimeError(f"the Docker Engine did not unpack the code into {path} of container {container_id[:12]}")


def attach_network(api: Any, container_id: str, log_path: str) -> str | None:
    """Give a started isolated container its way out (slirp4netns, blocking); None, or why it has none (it still
    runs, without outbound connections)."""
    pid = api.inspect_container(container_id)["State"].get("Pid")
    if not pid:
        return f"container {container_id[:12]} is not running"
    try:
        usernet.attach(int(pid), Path(log_path))
    except usernet.NoUserNet as exc:
        return str(exc)
    return None
