"""Private functions on every path: HTTP, the PUSH ingress, topics and task calls, tried as an outsider would.

A private function keeps the bodies it ran, so each test can tell "refused" from "ran and
failed": a message refused at the door must never reach the handler.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator

import pytest

from shared.ingress import Producer
from tests.stack import Stack, function_yaml, wait_for

pytestmark = [pytest.mark.integration]

INGRESS_TOKEN = "ingress-" + "7" * 24

# answers "ran?" with the bodies it ran so far (one instance: minReplicas = maxReplicas = 1)
KEEPER = """
RAN = []

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body == "ran?":
        return RAN
    RAN.append(body)
    return "ran " + body
"""

# calls "vault" (context.call) with its own name and says what came back
CALLER = """
def handler(context, event):
    try:
        return {"result": context.call("vault", "NAME")}
    except Exception as exc:
        return {"refused": type(exc).__name__, "status": getattr(exc, "status", None), "message": str(exc)}
"""


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("private") / "var", {"NUCLIDE_INGRESS_TOKEN": INGRESS_TOKEN})
    try:
        yield s.start()
    finally:
        s.stop()


def ran(stack: Stack, name: str) -> list[str]:
    r = stack.client.post(f"/{name}", content=b"ran?")
    assert r.status_code == 200, r.text
    return r.json()


def call_of(stack: Stack, call_id: str) -> dict[str, Any] | None:
    r = stack.client.get(f"/calls/{call_id}")
    return r.json() if r.status_code == 200 else None


def final(stack: Stack, call_id: str) -> dict[str, Any]:
    return wait_for(lambda: (c := call_of(stack, call_id)) and c["status"] in ("DONE", "FAILED", "DEAD") and c, 30,
                    what=f"call {call_id} to finish")


@contextlib.contextmanager
def publisher(stack: Stack, token: str = "") -> Iterator[Producer]:
    """A topic producer whose connection is up (see Stack.publisher), presenting ``token``."""
    with Producer(sub_endpoint=stack.endpoints["gateway_sub"], token=token) as p:
        seen = stack.metrics()["nuclide_ingress_topic_messages_total"]

        def arrived() -> bool:
            p.publish("nuclide-test-handshake", b"")
            return stack.metrics()["nuclide_ingress_topic_messages_total"] > seen

        wait_for(arrived, 10, what="the topic ingress to take a message")
        yield p


def keeper(stack: Stack, name: str, **spec: Any) -> None:
    spec = {"private": True, "minReplicas": 1, "maxReplicas": 1, **spec}
    stack.deploy(name, {"function.yaml": function_yaml(name, **spec), "main.py": KEEPER})


def test_http_needs_the_api_token_and_not_the_ingress_token(private_stack: Stack) -> None:
    s = private_stack
    keeper(s, "phttp")
    assert s.anon.post("/phttp", content=b"anon").status_code == 401
    r = s.anon.post("/phttp", content=b"ingress", headers={"Authorization": f"Bearer {INGRESS_TOKEN}"})
    assert r.status_code == 401, "the ingress token opens the ZeroMQ ingress only, never the HTTP API"
    assert s.client.post("/phttp", content=b"api").text == "ran api"
    assert ran(s, "phttp") == ["api"]


def test_a_push_without_the_token_is_refused_and_never_runs(private_stack: Stack) -> None:
    s = private_stack
    keeper(s, "ppush")
    prefix = f"ppush-{time.time_ns()}"
    with Producer(s.endpoints["gateway_pull"]) as anonymous:
        anonymous.invoke("ppush", b"no-token", call_id=f"{prefix}-none")
    with Producer(s.endpoints["gateway_pull"], token="wrong-" + INGRESS_TOKEN) as wrong:
        wrong.invoke("ppush", b"wrong-token", call_id=f"{prefix}-wrong")
    with Producer(s.endpoints["gateway_pull"], token=INGRESS_TOKEN) as good:
        good.invoke("ppush", b"ingress-token", call_id=f"{prefix}-ingress")
    with Producer(s.endpoints["gateway_pull"], token=s.token) as api:
        api.invoke("ppush", b"api-token", call_id=f"{prefix}-api")
    for suffix in ("none", "wrong"):
        refused = final(s, f"{prefix}-{suffix}")
        assert refused["status"] == "FAILED", refused
        assert "function 'ppush' is private: an ingress message for it needs a 'token'" in refused["error"]
        assert "ingress_token" in refused["error"], "the message says which credential to present"
    for suffix in ("ingress", "api"):
        assert final(s, f"{prefix}-{suffix}")["status"] == "DONE"
    assert sorted(ran(s, "ppush")) == ["api-token", "ingress-token"], "a refused message never reached the handler"
    assert s.metrics()["nuclide_ingress_refused_total"] >= 2


def test_a_topic_message_without_the_token_skips_a_private_subscriber(private_stack: Stack) -> None:
    s = private_stack
    topic = f"orders-{time.time_ns()}"
    trigger = {"t": {"kind": "topic", "attributes": {"topic": topic}}}
    keeper(s, "ptopic", triggers=trigger)
    keeper(s, "ptopic-public", private=False, triggers=trigger)  # sees every message: proof they all arrived
    with publisher(s) as anonymous:
        anonymous.publish(topic, b"bare")  # [topic, payload]: no header, no token
        anonymous.publish(topic, b"header-no-token", content_type="text/plain")
    with publisher(s, token="wrong") as wrong:
        wrong.publish(topic, b"wrong-token")
    with publisher(s, token=INGRESS_TOKEN) as good:
        good.publish(topic, b"with-token")
    sent = ["bare", "header-no-token", "wrong-token", "with-token"]
    wait_for(lambda: sorted(ran(s, "ptopic-public")) == sorted(sent), 30, what="the public subscriber to run all")
    wait_for(lambda: ran(s, "ptopic") == ["with-token"], 30, what="the private subscriber's one message")
    calls = s.client.get("/calls", params={"function": "ptopic", "limit": 100}).json()
    assert [c["source"] for c in calls if c["source"] == "topic"] == ["topic"], "no call record for a skipped message"
    assert ran(s, "ptopic") == ["with-token"], "messages without the token never reached the handler"


def test_task_calls_reach_a_private_function_only_from_its_group_or_allow_calls_from(private_stack: Stack) -> None:
    s = private_stack
    r = s.deploy("vault", {"function.yaml": function_yaml("vault", private=True, allowCallsFrom=["friend", "later"]),
                           "main.py": KEEPER})
    assert any("spec.allowCallsFrom names 'friend', 'later', not deployed here" in w
               for w in r.json().get("warnings", [])), r.json().get("warnings")
    for name in ("friend", "stranger", "insider"):
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": CALLER.replace("NAME", name)})
    out = s.invoke("friend").json()
    assert out == {"result": "ran friend"}, out
    out = s.invoke("stranger").json()
    assert out["refused"] == "CallFailed" and out["status"] == 403, out
    assert out["message"] == ("function 'vault' is private: function 'stranger' may not call it (only functions of its"
                              " fusion group and those its spec.allowCallsFrom names may)")
    assert ran(s, "vault") == ["friend"], "the refused call never reached the handler"
    # fused with the vault, a caller needs no listing: the call stays inside its instance
    assert s.client.put("/groups?wait=true", json=[["vault", "insider"]]).status_code == 200
    assert s.invoke("insider").json() == {"result": "ran insider"}
    assert s.client.put("/groups?wait=true", json=[["vault"], ["insider"]]).status_code == 200


def forged_call(link: str, function: str, header: dict[str, Any]) -> str:
    """A handler that speaks the wire protocol to the gateway over its instance link, with a header of its making."""
    return f"""
import time, uuid
import zmq
from shared import protocol

def own_keys():
    # the keypair the deployer issued to this instance is in its memory: a function can always find it
    import gc
    for o in gc.get_objects():
        for value in list(getattr(o, "__dict__", {{}}).values()):
            if isinstance(value, dict) and set(value) == {{"public", "secret", "server"}}:
                return value

def handler(context, event):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    keys = own_keys()
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server"].encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys["public"].encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["secret"].encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect({link!r})
    header = dict({header!r}, call_id=uuid.uuid4().hex, function={function!r},
                  deadline_ms=int(time.time() * 1000) + 10000)
    if header.get("instance") == "self":  # its own instance id, which it can learn (Lambda's log stream name)
        header["instance"] = context.log_stream_name
    sock.send_multipart(protocol.encode(protocol.CALL, header, b"forged"))
    if not sock.poll(10000):
        return {{"answer": None}}
    msg = protocol.decode(sock.recv_multipart())
    sock.close()
    return {{"command": msg.command.decode(), "status": msg.header.get("status"), "body": msg.body.decode()}}
"""


def test_a_forged_call_claiming_a_listed_caller_is_refused(private_stack: Stack) -> None:
    s = private_stack
    s.deploy("fvault", {"function.yaml": function_yaml("fvault", private=True, allowCallsFrom=["ffriend"]),
                        "main.py": KEEPER})
    s.deploy("ffriend", {"function.yaml": function_yaml("ffriend"), "main.py": KEEPER})
    link = f"ipc://{s.var_dir.resolve() / 'run' / 'link' / 'gateway.sock'}"
    base = {"method": "POST", "path": "/", "mode": "http", "depth": 1, "chain": ["forger"]}
    forgeries = {
        "claims-friend": {**base, "caller": "ffriend"},  # its own instance does not serve ffriend
        "claims-friend-from-itself": {**base, "caller": "ffriend", "instance": "self"},  # a real, other instance
        "claims-friend-and-its-instance": {**base, "caller": "ffriend", "instance": "g-ffriend-v1-000000"},
    }
    for name, header in forgeries.items():
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": forged_call(link, "fvault", header)})
        out = s.invoke(name).json()
        assert out["command"] == "RESULT" and out["status"] == 403, f"{name}: {out}"
        assert "function 'fvault' is private" in json.loads(out["body"])["error"]["message"], out
    assert ran(s, "fvault") == [], "no forged call reached the handler"


def test_bad_private_and_allow_calls_from_are_refused_naming_the_field(private_stack: Stack) -> None:
    s = private_stack
    cases = [
        ({"private": "yes"}, "function.yaml: spec.private must be true or false"),
        ({"private": True, "allowCallsFrom": "friend"},
         'function.yaml: spec.allowCallsFrom must be a list of function names (or ["*"] for any function)'),
        ({"private": True, "allowCallsFrom": [{"name": "friend"}]},
         'function.yaml: spec.allowCallsFrom[0] must be a function name or "*"'),
        ({"private": True, "allowCallsFrom": ["no such name!"]},
         "function.yaml: spec.allowCallsFrom[0] is not a function name: function name 'no such name!' is invalid:"
         " use 1-63 letters, digits, '-' or '_', starting with a letter or digit"),
    ]
    for spec, message in cases:
        r = s.deploy("pbad", {"function.yaml": function_yaml("pbad", **spec), "main.py": KEEPER}, expect=400)
        assert r.json()["error"]["message"].startswith(message), r.json()
    assert s.client.get("/functions/pbad").status_code == 404, "a refused deploy changes nothing"
