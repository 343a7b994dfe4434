"""Who may call a private function (services/gateway/taskcalls.TaskCalls.check_caller), as pure logic.

The caller is the instance the broker tied the CALL to; during a regroup that instance may still be of the
group its function leaves while the function's group in force is already the callee's.
"""

from __future__ import annotations

import types

import pytest

from services.gateway.taskcalls import TaskCalls
from shared.errors import Forbidden


def _task_calls(instances: dict[str, dict], groups: dict[str, str]) -> TaskCalls:
    by_name = {name: types.SimpleNamespace(group=i["group"], functions=i["functions"]) for name, i in instances.items()}
    functions = {name: types.SimpleNamespace(group_id=group) for name, group in groups.items()}
    return TaskCalls(types.SimpleNamespace(functions=functions), types.SimpleNamespace(by_name=by_name),  # type: ignore[arg-type]
                     None, None, lambda info: False, lambda: "id", "127.0.0.1")  # type: ignore[arg-type]


VAULT = types.SimpleNamespace(name="vault", group_id="g-new", allow_calls_from=frozenset())


def test_an_instance_of_the_group_a_caller_leaves_may_call_once_its_function_joined_the_callee() -> None:
    tc = _task_calls({"old-1": {"group": "g-old", "functions": {"insider": 1}}},
                     {"insider": "g-new", "vault": "g-new"})
    tc.check_caller(VAULT, {"instance": "old-1", "caller": "insider"})  # no Forbidden


@pytest.mark.parametrize("instances, groups, header", [
    # the function's group in force is another one: refused, whatever the instance
    ({"old-1": {"group": "g-old", "functions": {"stranger": 1}}}, {"stranger": "g-other"},
     {"instance": "old-1", "caller": "stranger"}),
    # a caller that names a function its instance does not serve gets nothing from that function's group
    ({"old-1": {"group": "g-old", "functions": {"stranger": 1}}}, {"insider": "g-new", "stranger": "g-other"},
     {"instance": "old-1", "caller": "insider"}),
    # no registered instance behind the call
    ({}, {"insider": "g-new"}, {"instance": "nobody", "caller": "insider"}),
])
def test_everyone_else_is_refused(instances: dict, groups: dict, header: dict) -> None:
    with pytest.raises(Forbidden, match="function 'vault' is private"):
        _task_calls(instances, groups).check_caller(VAULT, header)
