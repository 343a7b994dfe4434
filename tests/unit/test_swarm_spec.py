"""What a group's Docker Swarm service is made of (services/deployer/backends/swarm/spec.py): pure functions."""

from __future__ import annotations

import json
import re

import pytest

from services.deployer.backends.swarm.spec import (
    MAX_NAME, NO_NEW_PRIVS_EXEC, TASK_ID, instance_id, replicas_of, service_name, service_spec, swarm_problem,
    templated_config,
)
from shared.config import ConfigError, Settings


@pytest.mark.parametrize("info, needle", [
    ({}, "Docker Swarm is not active on this node (state: inactive): run 'docker swarm init'"),
    ({"Swarm": {"LocalNodeState": "pending"}}, "(state: pending)"),
    ({"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}}, "a Docker Swarm worker, not a manager"),
])
def test_an_engine_that_cannot_run_services_is_named_with_the_fix(info, needle: str) -> None:
    problem = swarm_problem(info)
    assert problem is not None and needle in problem


def test_a_manager_node_can_run_services() -> None:
    assert swarm_problem({"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}) is None


def test_service_names_are_valid_and_unique() -> None:
    assert service_name("ab12", "g-hello") == "nuclide-ab12-g-hello"
    long_a, long_b = "g-" + "a" * 80, "g-" + "a" * 79 + "b"
    names = {service_name("ab12", g) for g in (long_a, long_b, "g-x_y", "g-x.y")}
    assert len(names) == 4
    for name in names:
        assert len(name) <= MAX_NAME and re.fullmatch(r"[A-Za-z0-9-]+", name), name


def test_each_task_gets_its_own_instance_id_from_swarm_and_the_config_keeps_its_braces() -> None:
    config = {"functions": [{"env": {"TEMPLATE": "{{ not for swarm }}"}}], "gateway": "tcp://127.0.0.1:1"}
    text = templated_config(config, "g-f", 3)
    # Swarm expands {{.Task.ID}}; a literal "{{" of the config is written as a template printing "{{"
    assert TASK_ID in text and '{{"{{"}}' in text
    expanded = text.replace(TASK_ID, "task123").replace('{{"{{"}}', "{{")
    back = json.loads(expanded)
    assert back["instance_id"] == instance_id("g-f", 3, "task123") == "g-f-v3-task123"
    assert back["functions"][0]["env"]["TEMPLATE"] == "{{ not for swarm }}"


def _spec(**over) -> dict:
    args = dict(name="nuclide-ns-g-f", labels={"nuclide.group": "g-f", "nuclide.group_version": "2"},
                image="sha256:abc", command=["/bin/sh", "-c", "copy and serve", "nuclide-instance", "/a", "/b"],
                env={"A": "1"}, user="65534:65534", workdir="/tmp", memory_bytes=256 * 2**20, cpu="0.5",
                pids=128, tmp_bytes=64 * 2**20, replicas=3, network="hostnetid",
                log_options={"max-size": "10m", "max-file": "3"})
    args.update(over)
    return service_spec(**args)


def test_a_service_runs_locked_down_on_the_host_network_with_no_published_port() -> None:
    body = _spec()
    c = body["TaskTemplate"]["ContainerSpec"]
    assert c["User"] == "65534:65534" and c["ReadOnly"] is True and c["CapabilityDrop"] == ["ALL"]
    assert c["Mounts"] == [{"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 64 * 2**20,
                                                                                 "Mode": 0o1777}}]
    assert c["Ulimits"] == [{"Name": "data", "Soft": 256 * 2**20, "Hard": 256 * 2**20}]
    # no_new_privs is set by the task's first process before anything of the function runs
    assert c["Command"][:3] == ["python3", "-c", NO_NEW_PRIVS_EXEC]
    assert c["Command"][3:] == ["/bin/sh", "-c", "copy and serve", "nuclide-instance", "/a", "/b"]
    assert c["Env"] == ["A=1"] and c["Labels"] == {"nuclide.group": "g-f", "nuclide.group_version": "2"}
    limits = body["TaskTemplate"]["Resources"]["Limits"]
    assert limits == {"MemoryBytes": 256 * 2**20, "Pids": 128, "NanoCPUs": 500_000_000}
    assert body["TaskTemplate"]["Networks"] == [{"Target": "hostnetid"}]
    assert body["EndpointSpec"] == {"Mode": "dnsrr"}
    assert body["Mode"] == {"Replicated": {"Replicas": 3}} and replicas_of({"Spec": body}) == 3
    assert body["Labels"]["nuclide.kind"] == "service"
    # a new version starts before an old task stops, one at a time, and a failed update rolls back
    assert body["UpdateConfig"]["Order"] == "start-first" and body["UpdateConfig"]["FailureAction"] == "rollback"
    assert body["RollbackConfig"]["Order"] == "start-first"


def test_no_cpu_limit_unless_asked_and_a_command_not_through_sh_is_kept() -> None:
    body = _spec(cpu=None, command=["python3", "-m", "x"])
    assert "NanoCPUs" not in body["TaskTemplate"]["Resources"]["Limits"]
    assert body["TaskTemplate"]["ContainerSpec"]["Command"] == ["python3", "-m", "x"]


def test_replicas_of_a_service_without_a_mode_is_zero() -> None:
    assert replicas_of({}) == 0 and replicas_of({"Spec": {"Mode": {"Global": {}}}}) == 0


@pytest.mark.parametrize("value", ["https://registry.example.com", "Registry:5000", "reg:port", "reg/x:tag"])
def test_a_swarm_registry_that_is_not_an_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="swarm_registry .* is not a registry address"):
        Settings(swarm_registry=value).validate()


@pytest.mark.parametrize("value", ["", "registry.example.com", "127.0.0.1:5000/nuclide", "reg-1.local:443/a/b"])
def test_a_swarm_registry_address_is_accepted(value: str) -> None:
    Settings(swarm_registry=value).validate()
