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
