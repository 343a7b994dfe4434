"""Pure rules for fused groups: one spec from the members' specs, and setup validation.

A fused group runs every member in one instance, so it needs one environment:
requirements are merged (the same package pinned differently by two tasks is a
conflict, named), build commands run in member order, and resources combine:
memory and CPU are the SUM of members' limits (they share one process), timeout the MAX,
concurrency the MIN, replicas the MAX of minReplicas.
"""

from __future__ import annotations

import re
from typing import Any

from shared.errors import Conflict, InvalidRequest
from shared.spec import DEFAULT_PIDS, DEFAULT_SCRATCH_BYTES, HOST_RUNTIME, other_python

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def merge_requirements(requirements: dict[str, str]) -> str:
    """Merge requirements.txt texts by task; raises Conflict naming both tasks and the package."""
    chosen: dict[str, tuple[str, str, str]] = {}  # package -> (specifier, task, line)
    order: list[str] = []
    passthrough: list[str] = []
    for task in sorted(requirements):
        for raw in requirements[task].splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _NAME.match(line.split(";", 1)[0])
            if m is None:
                passthrough.append(line)
                continue
            package = _canonical(m.group(1))
            specifier = m.group(3).replace(" ", "")
            if package not in chosen:
                chosen[package] = (specifier, task, line)
                order.append(package)
                continue
            old_spec, old_task, _ = chosen[package]
            if specifier and old_spec and specifier != old_spec:
                raise Conflict(
                    f"tasks '{old_task}' and '{task}' need different versions of '{package}' "
                    f"({old_spec} vs {specifier}); align their requirements.txt to fuse them",
                    {"package": package, "tasks": [old_task, task]},
                )
            if specifier and not old_spec:
                chosen[package] = (specifier, task, line)
    lines = list(dict.fromkeys([chosen[p][2] for p in order] + passthrough))
    return "\n".join(lines) + ("\n" if lines else "")


def scale_bounds(specs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """A group's autoscaling limits from its members' specs (each a FunctionSpec.to_dict()).

    The group runs as one deployment, so it gets the most any member needs at least (its minimum) and
    no more than any member allows (a member's maxReplicas is a promise to it, e.g. a singleton), and
    one instance carries the least concurrency any member asks for, as ``max_concurrency`` does.
    """
    names = sorted(specs)
    low = max(int(specs[n].get("min_replicas", 1) or 0) for n in names)
    high = min(int(specs[n].get("max_replicas") or max(int(specs[n].get("min_replicas", 1) or 0), 1)) for n in names)
    targets = [int(specs[n].get("target_concurrency") or specs[n].get("max_concurrency") or 1) for n in names]
    return {"max_replicas": max(high, low, 1), "target_concurrency": min(targets)}


def merge_specs(specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The group-level settings for members' spec dicts (FunctionSpec.to_dict())."""
    if not specs:
        raise InvalidRequest("a group needs at least one task")
    names = sorted(specs)
    registered = [n for n in names if specs[n].get("registered_runtime")]
    if registered and len(names) > 1:
        # a registered runtime runs a command per call in its own image: nothing to fuse in-process
        raise Conflict(f"task '{registered[0]}' runs on the registered runtime '{specs[registered[0]].get('runtime')}' and"
                       " cannot be fused with other tasks; keep it in a group of its own",
                       {"tasks": names, "runtime_task": registered[0]})
    per_call = [n for n in names if (specs[n].get("warm_start") or "function") != "function"]
    if per_call and len(names) > 1:
        # each call gets a process of its own: no instance to share with other tasks
        raise Conflict(f"task '{per_call[0]}' runs each call in a container of its own (spec.warmStart"
                       f" '{specs[per_call[0]]['warm_start']}') and cannot be fused with other tasks; keep it in a"
                       " group of its own or use warmStart 'function'", {"tasks": names, "per_call_task": per_call[0]})
    pythons = {other_python(specs[n].get("runtime")) for n in names}
    if len(pythons) > 1:
        # one instance is one interpreter
        raise Conflict(f"tasks {names} run on different Pythons ({', '.join(sorted(f'python:{p}' if p else HOST_RUNTIME for p in pythons))});"
                       " give them the same spec.runtime to fuse them", {"tasks": names})
    commands: list[str] = []
    for name in names:
        for command in specs[name].get("build_commands") or []:
            if command not in commands:
                commands.append(command)
    memories = [int(specs[n]["memory_bytes"]) for n in names if specs[n].get("memory_bytes")]
    cpus = [float(specs[n]["cpu"]) for n in names if specs[n].get("cpu")]
    pids = [int(specs[n].get("pids") or DEFAULT_PIDS) for n in names]
    scratch = [int(specs[n].get("scratch_bytes") or DEFAULT_SCRATCH_BYTES) for n in names]
    return {
        "requirements": merge_requirements({n: specs[n].get("requirements") or "" for n in names}),
        "build_commands": commands,
        "memory_bytes": sum(memories) if memories else None,
        "cpu": sum(cpus) if cpus else None,
        # one process holds every member: the sum of their limits, host networking if any member needs it
        "pids": sum(pids) if len(names) > 1 else pids[0],
        "scratch_bytes": sum(scratch) if len(names) > 1 else scratch[0],
        "network": "host" if any(specs[n].get("network") == "host" for n in names) else "isolated",
        "timeout_s": max(float(specs[n].get("timeout_s") or 30.0) for n in names),
        "max_concurrency": min(int(specs[n].get("max_concurrency") or 1) for n in names),
        "min_replicas": max(max(int(specs[n].get("min_replicas", 1) or 0), 1) for n in names),
        **scale_bounds(specs),
        "python": pythons.pop(),  # "3.X" for another Python 3 than the platform's, else None
    }


def validate_setup(setup: Any, known: set[str]) -> list[list[str]]:
    """A setup is a list of non-empty lists of deployed task names, each name once."""
    if isinstance(setup, dict) and "setup" in setup:
        setup = setup["setup"]
    if not isinstance(setup, list) or not setup:
        raise InvalidRequest('a setup is a non-empty JSON list of groups, e.g. [["taska", "taskb"], ["taskc"]]')
    seen: set[str] = set()
    duplicated: list[str] = []
    unknown: list[str] = []
    groups: list[list[str]] = []
    for i, group in enumerate(setup):
        if not isinstance(group, list) or not all(isinstance(n, str) for n in group):
            raise InvalidRequest(f"group {i} of the setup is not a list of task names")
        if not group:
            raise InvalidRequest(f"group {i} of the setup is empty; every group needs at least one task")
        for name in group:
            if name in seen and name not in duplicated:
                duplicated.append(name)
            seen.add(name)
            if name not in known and name not in unknown:
                unknown.append(name)
        groups.append(list(dict.fromkeys(group)))
    problems = []
    if unknown:
        problems.append(f"unknown tasks: {', '.join(unknown)} (deploy them first)")
    if duplicated:
        problems.append(f"tasks in more than one group: {', '.join(duplicated)}")
    if problems:
        raise InvalidRequest("invalid setup: " + "; ".join(problems), {"unknown": unknown, "duplicated": duplicated})
    return groups
