"""A per-call container the engine fails to set up is replaced once (services/deployer/backends/docker/runner).

Docker Engine on a busy host sometimes answers a start with "OCI runtime create failed ... stat /bin/sh:
permission denied": runc never started the container's process, so nothing of the call ran and a second
container is safe. This stages the engine's answers (the failure cannot be caused at will on a real engine);
the per-call path itself runs on a real engine in tests/integration/test_python_warm_start.py.
"""

from __future__ import annotations

import docker.errors
import pytest

from services.deployer.backends.docker.runner import box
from services.deployer.backends.docker.runner.driver import CallContainers

OCI = ('failed to create shim task: OCI runtime create failed: runc create failed: unable to start container'
       ' process: exec: "/bin/sh": stat /bin/sh: permission denied: unknown')


class Engine:
    """The calls CallContainers makes of the engine's API, answering ``start`` from ``failures`` in turn."""

    def __init__(self, failures: list[str | None]) -> None:
        self.failures = failures
        self.created: list[str] = []
        self.started: list[str] = []
        self.removed: list[str] = []

    def attach_socket(self, cid: str, params: dict) -> "Sock":
        return Sock()

    def start(self, cid: str) -> None:
        failure = self.failures.pop(0)
        if failure is not None:
            raise docker.errors.APIError("400 Client Error", explanation=failure)
        self.started.append(cid)

    def remove_container(self, cid: str, force: bool, v: bool) -> None:
        self.removed.append(cid)


class Sock:
    def close(self) -> None:
        pass


def _containers(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> CallContainers:
    cc = CallContainers.__new__(CallContainers)
    cc.api = engine

    def create(argv, auto_remove, stdin_once, env=None):
        engine.created.append(f"c{len(engine.created) + 1}")
        return engine.created[-1]

    monkeypatch.setattr(cc, "_create", create)
    monkeypatch.setattr(box, "START_RETRY_S", 0.0)
    return cc


def test_a_container_the_engine_failed_to_set_up_is_replaced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine([OCI, None])
    cid, _ = _containers(engine, monkeypatch)._start_fresh(["sh"], None)
    assert (cid, engine.created, engine.started, engine.removed) == ("c2", ["c1", "c2"], ["c2"], ["c1"])


def test_twice_or_another_error_is_raised_and_leaves_no_container(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine([OCI, OCI])
    with pytest.raises(docker.errors.APIError, match="OCI runtime create failed"):
        _containers(engine, monkeypatch)._start_fresh(["sh"], None)
    assert engine.removed == ["c1", "c2"] and engine.started == []

    engine = Engine(["no such image"])
    with pytest.raises(docker.errors.APIError, match="no such image"):
        _containers(engine, monkeypatch)._start_fresh(["sh"], None)
    assert engine.created == ["c1"] and engine.removed == ["c1"]
