"""What a group's Swarm service is made of (pure: the backend and the unit tests call it).

A service runs the group version's image (built by the docker backend's ``images.py``), one task
per replica, locked down as the docker backend's containers are: read-only root, a tmpfs ``/tmp``
that holds the code directory too (``WORK_DIR``), no capabilities, no-new-privileges, user 65534,
memory, CPU, pids and data limits, the host network, no published ports, no mounts of the host.
Engine 20.10's service API has no no-new-privileges field, so the task's first process sets it
(``prctl``) before it runs anything else, and every process after inherits it.

Each task's instance id is the group version and the task's id, filled in by Swarm itself
(templates in the environment), so the id an instance says in its READY is one the backend
finds again in the task list, also after a deployer restart.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from shared.liveness import DRAIN_TIMEOUT_S

TASK_ID = "{{.Task.ID}}"  # a Swarm template: each task's environment gets its own id
TERMINAL_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})
STOPPED_BY_SWARM = frozenset({"shutdown", "remove", "orphaned"})  # ended because Swarm stopped it, not by itself
UPDATE_MONITOR_S = 5.0  # a replaced task that fails within this is a failed update: Swarm rolls back
RESTART_DELAY_S = 1.0  # between a task's exit and its replacement
STOP_GRACE_S = DRAIN_TIMEOUT_S + 2.0  # SIGTERM, then this long to drain before SIGKILL
MAX_NAME = 63
WORK_DIR = "/tmp/nuclide-work"  # each member's code is copied here at start: writable, as on the other backends
# the task's first process: no_new_privs (prctl PR_SET_NO_NEW_PRIVS), then exec the rest of argv
NO_NEW_PRIVS_EXEC = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('nuclide: could not set no_new_privs')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def swarm_problem(info: dict[str, Any]) -> str | None:
    """Why this engine cannot run the swarm backend (from ``docker info``), with the fix; None when it can."""
    swarm = info.get("Swarm") or {}
    state = swarm.get("LocalNodeState") or "inactive"
    if state != "active":
        return (f"Docker Swarm is not active on this node (state: {state}): run 'docker swarm init' (or join a"
                " swarm as a manager), or set backend to docker")
    if not swarm.get("ControlAvailable"):
        return ("this node is a Docker Swarm worker, not a manager: run the deployer on a manager node (or"
                " 'docker node promote <node>' this one from a manager)")
    return None


def service_name(namespace: str, group_id: str) -> str:
    """``nuclide-<namespace>-<group>``: letters, digits and '-' only, at most 63 characters (a hash keeps
    it unique when the group id has to be cut or changed)."""
    name = f"nuclide-{namespace}-{group_id}"
    clean = re.sub(r"[^A-Za-z0-9-]", "-", name)
    if clean == name and len(name) <= MAX_NAME:
        return name
    suffix = hashlib.sha1(group_id.encode()).hexdigest()[:8]
    return f"{clean[:MAX_NAME - 9].rstrip('-')}-{suffix}"


def instance_id(group_id: str, version: int, task_id: str) -> str:
    return f"{group_id}-v{version}-{task_id}"


def templated_config(config: dict[str, Any], group_id: str, version: int) -> str:
    """The instance config as an environment value Swarm expands per task: the instance id becomes the
    task's, and any ``{{`` of the config itself stays literal."""
    marker = "@nuclide-task-id-" + hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest() + "@"
    text = json.dumps(dict(config, instance_id=instance_id(group_id, version, marker)))
    return text.replace("{{", '{{"{{"}}').replace(marker, TASK_ID)


def service_spec(*, name: str, labels: dict[str, str], image: str, command: list[str], env: dict[str, str],
                 user: str, workdir: str, memory_bytes: int, cpu: Any, pids: int, tmp_bytes: int,
                 replicas: int, network: str, log_options: dict[str, str]) -> dict[str, Any]:
    """The service's specification, in the Engine API's own terms (``POST /services/create``)."""
    ns = 1_000_000_000
    limits: dict[str, Any] = {"MemoryBytes": int(memory_bytes), "Pids": int(pids)}
    if cpu:
        limits["NanoCPUs"] = int(float(cpu) * ns)
    return {
        "Name": name,
        "Labels": dict(labels, **{"nuclide.kind": "service"}),
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image,
                "Labels": labels,
                "Command": ["python3", "-c", NO_NEW_PRIVS_EXEC, "/bin/sh", *command[1:]]
                if command[:1] == ["/bin/sh"] else command,
                "Env": [f"{k}={v}" for k, v in env.items()],
                "User": user,
                "Dir": workdir,
                "ReadOnly": True,
                "CapabilityDrop": ["ALL"],
                # the code is copied under /tmp: a tmpfs mount point takes its owner from the image (root),
                # and this API version cannot set it, so a mount of its own would not be writable
                "Mounts": [{"Type": "tmpfs", "Target": "/tmp",
                            "TmpfsOptions": {"SizeBytes": int(tmp_bytes), "Mode": 0o1777}}],
                "Ulimits": [{"Name": "data", "Soft": int(memory_bytes), "Hard": int(memory_bytes)}],
                "StopSignal": "SIGTERM",
                "StopGracePeriod": int(STOP_GRACE_S * ns),
            },
            "Resources": {"Limits": limits},
            "RestartPolicy": {"Condition": "any", "Delay": int(RESTART_DELAY_S * ns), "MaxAttempts": 0},
            "Networks": [{"Target": network}],
            "LogDriver": {"Name": "json-file", "Options": dict(log_options)},
        },
        "Mode": {"Replicated": {"Replicas": int(replicas)}},
        # a new version's task starts (and runs) before an old one is stopped; one at a time
        "UpdateConfig": {"Parallelism": 1, "Delay": 0, "FailureAction": "rollback",
                         "Monitor": int(UPDATE_MONITOR_S * ns), "MaxFailureRatio": 0, "Order": "start-first"},
        "RollbackConfig": {"Parallelism": 1, "Delay": 0, "FailureAction": "pause",
                           "Monitor": int(UPDATE_MONITOR_S * ns), "MaxFailureRatio": 0, "Order": "start-first"},
        # no virtual IP, no published port: instances connect out to the gateways, nothing connects in
        "EndpointSpec": {"Mode": "dnsrr"},
    }


def replicas_of(service: dict[str, Any]) -> int:
    return int(((service.get("Spec") or {}).get("Mode") or {}).get("Replicated", {}).get("Replicas") or 0)
