"""Every bad input gets a clear 4xx, changes nothing, and the services keep serving."""

from __future__ import annotations

import contextlib
import io
import zipfile
from typing import Any, Iterator

import pytest
import zmq

from shared import protocol
from tests.stack import Stack, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration

GOOD = "def handler(context, event):\n    return 'good'\n"


def _put(stack: Stack, name: str, data: bytes, **kw):
    return stack.client.put(f"/{name}", files={"zip_file": ("task.zip", data, "application/zip")}, **kw)


def _error(resp) -> str:
    return resp.json()["error"]["message"]


@pytest.fixture(scope="module")
def keeper(stack: Stack) -> str:
    stack.deploy("keeper", {"function.yaml": function_yaml("keeper"), "main.py": GOOD})
    return "keeper"


def _state(stack: Stack) -> dict[str, Any]:
    """What a refused request must not change: functions and their versions, stored blobs, code directories."""
    var = stack.var_dir
    return {
        "functions": sorted((f["name"], f["version"], f.get("latest_version"), f["state"], f["updated_at"])
                            for f in stack.client.get("/functions").json()),
        "blobs": sorted(str(p.relative_to(var)) for p in (var / "blobs").rglob("*")),
        "code": sorted(str(p.relative_to(var)) for p in (var / "functions").glob("*/*")),
    }


@contextlib.contextmanager
def changes_nothing(stack: Stack, keeper: str) -> Iterator[None]:
    """The requests inside leave every function, blob and code directory as they were; keeper still serves."""
    before = _state(stack)
    yield
    after = _state(stack)
    assert after == before, f"a refused request changed the stack: {before} -> {after}"
    assert stack.invoke(keeper).text == "good"


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", GOOD)
        info = zipfile.ZipInfo("link.py")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("label,data,needle", [
    ("not a zip", b"this is not a zip", "not a zip"),
    ("traversal", make_zip({"main.py": GOOD, "../evil.py": "x"}), "../evil.py"),
    ("absolute", make_zip({"main.py": GOOD, "/etc/cron.d/x": "x"}), "/etc/cron.d/x"),
    ("symlink", _symlink_zip(), "link.py"),
    ("bad yaml", make_zip({"function.yaml": "spec: [unclosed", "main.py": GOOD}), "function.yaml"),
    ("bad field", make_zip({"function.yaml": "spec:\n  handler: main:handler\n  minReplicas: lots\n", "main.py": GOOD}),
     "spec.minReplicas"),
    ("missing module", make_zip({"function.yaml": function_yaml("x", "nomod:handler"), "main.py": GOOD}), "nomod"),
    ("missing function", make_zip({"function.yaml": function_yaml("x", "main:handle"), "main.py": GOOD}),
     "handler 'main:handle' not found in main.py"),
    ("no handler anywhere", make_zip({"util.py": "X = 1\n"}), "handler"),
    ("syntax error", make_zip({"function.yaml": function_yaml("x"), "main.py": "def handler(:\n"}), "main.py"),
])
def test_bad_archives_are_refused(stack: Stack, keeper: str, label: str, data: bytes, needle: str) -> None:
    with changes_nothing(stack, keeper):
        resp = _put(stack, f"bad-{label.replace(' ', '-')}", data)
    assert resp.status_code == 400, f"{label}: {resp.status_code} {resp.text}"
    assert needle in _error(resp), f"{label}: {_error(resp)}"


def test_zip_bomb_is_refused(stack: Stack, keeper: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("main.py", GOOD)
        with zf.open("bomb.bin", "w") as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(300):
                fh.write(chunk)
    with changes_nothing(stack, keeper):
        resp = _put(stack, "bomb", buf.getvalue())
    assert resp.status_code == 400
    assert "bomb.bin" in _error(resp) or "expands to" in _error(resp)


def test_too_many_entries(stack: Stack, keeper: str) -> None:
    files = {f"f{i}.txt": "x" for i in range(2100)}
    files["main.py"] = GOOD
    with changes_nothing(stack, keeper):
        resp = _put(stack, "many", make_zip(files))
    assert resp.status_code == 400 and "entries" in _error(resp)


@pytest.mark.parametrize("name,needle", [("bad/name", "invalid"), ("with space", "invalid"), ("docs", "reserved"),
                                         ("functions", "reserved"), ("healthz", "reserved"), ("a" * 64, "invalid"),
                                         ("-dash", "invalid"), ("Metrics", "reserved"), ("functions/a/b", "invalid")])
def test_invalid_and_reserved_names(stack: Stack, keeper: str, name: str, needle: str) -> None:
    with changes_nothing(stack, keeper):
        resp = _put(stack, name, make_zip({"main.py": GOOD}))
    # the README: names are 1-63 letters, digits, '-' or '_'; route names are refused with a 400
    assert resp.status_code == 400 and needle in _error(resp), resp.text


def test_reserved_names_refused_with_clear_400(stack: Stack) -> None:
    for name in ("docs", "metrics", "calls", "groups", "runtimes"):
        resp = stack.client.put(f"/functions/{name}", content=make_zip({"main.py": GOOD}),
                                headers={"content-type": "application/zip"})
        assert resp.status_code == 400, (name, resp.text)
        assert "reserved" in _error(resp)


def test_handler_that_raises_at_import_gets_422_with_log_tail(stack: Stack, keeper: str) -> None:
    code = "raise RuntimeError('database url missing at import')\n\ndef handler(context, event):\n    return 1\n"
    resp = _put(stack, "importfail", make_zip({"function.yaml": function_yaml("importfail"), "main.py": code}))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert "failed" in err["message"]
    assert "database url missing at import" in err["details"]["log_tail"]
    desc = stack.client.get("/importfail").json()
    assert desc["state"] == "failed" and "database url missing" in desc["last_error"]
    r = stack.invoke("importfail")
    assert r.status_code == 503 and "deployment failed" in _error(r)
    assert stack.invoke(keeper).text == "good"


def test_failed_redeploy_keeps_the_previous_version_serving(stack: Stack) -> None:
    stack.deploy("stable", {"function.yaml": function_yaml("stable"), "main.py": GOOD})
    bad = "import not_a_real_module_xyz\n\ndef handler(context, event):\n    return 'bad'\n"
    resp = _put(stack, "stable", make_zip({"function.yaml": function_yaml("stable"), "main.py": bad}))
    assert resp.status_code == 422
    assert "not_a_real_module_xyz" in resp.json()["error"]["details"]["log_tail"]
    desc = stack.client.get("/stable").json()
    assert desc["version"] == 1 and desc["state"] == "ready" and desc["latest_version"] == 2
    assert desc["latest_version_state"] == "failed" and "not_a_real_module_xyz" in desc["last_error"]
    assert stack.invoke("stable").text == "good"


def test_failed_build_gets_422_with_pip_output(stack: Stack) -> None:
    # a requirement pip itself cannot read: it fails before asking any package index
    resp = _put(stack, "nodeps", make_zip({"function.yaml": function_yaml("nodeps"), "main.py": GOOD,
                                           "requirements.txt": "nuclide-missing ==== 1\n"}))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert "pip install" in err["message"]
    assert "Invalid requirement: 'nuclide-missing ==== 1'" in err["details"]["log_tail"]


def test_requirements_may_not_redirect_the_index(stack: Stack) -> None:
    resp = _put(stack, "evilreq", make_zip({"main.py": GOOD, "requirements.txt": "--index-url http://evil/simple\nflask\n"}))
    assert resp.status_code == 400 and "--index-url" in _error(resp)


def test_invoke_body_over_the_limit_gets_413(stack: Stack) -> None:
    stack.deploy("sizer", {"function.yaml": function_yaml("sizer"), "main.py": GOOD})
    resp = stack.invoke("sizer", b"x" * (6 * 1024 * 1024 + 1))
    assert resp.status_code == 413
    assert str(6 * 1024 * 1024) in _error(resp)
    assert stack.invoke("sizer", b"small").text == "good"


def test_unknown_function_404(stack: Stack) -> None:
    resp = stack.invoke("nope-not-here")
    assert resp.status_code == 404 and _error(resp) == "function 'nope-not-here' not found"
    assert stack.client.get("/nope-not-here").status_code == 404
    assert stack.client.delete("/nope-not-here").status_code == 404


def test_missing_or_wrong_token_401(stack: Stack, keeper: str) -> None:
    data = make_zip({"main.py": GOOD})
    with changes_nothing(stack, keeper):
        assert stack.anon.put("/sneaky", content=data).status_code == 401
        assert stack.anon.put("/keeper", content=data, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert stack.anon.get("/functions").status_code == 401
        assert stack.anon.delete("/keeper").status_code == 401
        r = stack.anon.get("/keeper", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "token" in _error(r)


def test_empty_and_fileless_uploads(stack: Stack) -> None:
    r = stack.client.put("/empty", content=b"")
    assert r.status_code == 400 and "no body" in _error(r)
    r = stack.client.put("/nofile", data={"field": "value"}, files={"other": ("x.txt", b"")})
    assert r.status_code == 400


MALFORMED = [
    [b"garbage"],
    [b"NUC9", b"REQ", protocol.pack_header({"id": 1})],
    [b"NUC1", b"WHAT", protocol.pack_header({"id": 1})],
    [b"NUC1", b"REQ", b"\xc1\xc1 not msgpack"],
    [b"NUC1", b"REQ", protocol.pack_header([1, 2])],
    [b"NUC1", b"REQ", protocol.pack_header({"id": 1, "method": "nope", "args": {}})],
    [b"NUC1", b"READY", protocol.pack_header({"functions": "nope"})],
    [b"NUC1", b"RESULT", protocol.pack_header({"call_id": "unknown"}), b""],
    [b"NUC1"] + [b"x"] * 40,
]


@pytest.mark.parametrize("socket_name", ["store_rpc", "deployer_rpc", "gateway_router"])
def test_malformed_frames_are_dropped_and_services_keep_serving(stack: Stack, keeper: str,
                                                                socket_name: str) -> None:
    with changes_nothing(stack, keeper):
        ctx = zmq.Context.instance()
        # a member of the platform (a service key) sending garbage: the frames reach the service's handling
        sock = stack.keys().client(ctx.socket(zmq.DEALER), socket_name.split("_")[0])
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.endpoints[socket_name])
        try:
            for frames in MALFORMED:
                sock.send_multipart(frames)
            # where a reply is expected, a REQ with an unknown method is answered with ERR
            if socket_name != "gateway_router":
                sock.send_multipart(protocol.request(7, "no.such.method"))
                assert sock.poll(5000), "no ERR reply to an unknown method"
                replies = []
                while sock.poll(200):
                    replies.append(protocol.decode(sock.recv_multipart()))
                assert any(m.command == protocol.ERR and m.header["id"] == 7 for m in replies)
        finally:
            sock.close(linger=0)
        wait_for(lambda: stack.anon.get("/healthz").status_code == 200, 10, what="health after malformed frames")
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} died on malformed input"
