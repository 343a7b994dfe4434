"""Task code shared by several tests: the Nuclio Fusionizer's TaskA/TaskB pair, written to its contract."""

TASK_B = """
def handler(context, event):
    body = event.body
    return body["value1"] + body["value2"]
"""

TASK_A = """
def handler(context, event, requests_session):
    host = event.headers["Fusionizer-Server-Address"]
    resp = requests_session.post(f"http://{host}:8000/TaskB", json={"value1": 5, "value2": 3})
    resp.raise_for_status()
    return resp.json()
"""


# Handler-side helpers for sandbox probes: attempt(fn) -> "ok" or the exception's class name.
PROBE_HELPERS = """
import os

def attempt(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return type(exc).__name__

def write(path):
    with open(path, "w") as fh:
        fh.write("x")
"""


# nuclio's own call_function test: the caller rewrites its event and sends it on; the callee reports it
NUCLIO_CALLER = """
def handler(context, event):
    event.body["caller_body_value"] = "caller_body"
    event.headers = {"x-caller-header-value": "caller_header"}
    event.method = "PUT"
    event.path = "/caller/path"
    return context.platform.call_function(event.body["callee_name"], event, timeout=5)
"""

NUCLIO_CALLEE = """
def handler(context, event):
    if event.body.get("fail"):
        raise ValueError("callee failed on purpose")
    header = event.headers["X-Caller-Header-Value"]
    return context.Response(status_code=201, headers={"X-Callee-Received-Header": header}, body={
        "callee_received_body": event.body["caller_body_value"], "callee_received_header": header,
        "callee_received_method": event.method, "callee_received_path": event.path})
"""
