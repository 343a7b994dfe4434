"""The web dashboard at /ui in a real headless Chromium: log in, deploy (picked or dropped, the build's output
streaming), invoke, follow logs live, redrive a dead letter, see the call graph.

Each page's screenshot is saved under the test's temporary directory; with
NUCLIDE_SCREENSHOT_DIR set (e.g. to docs/screenshots) the README's ones (one per page) are
copied there too, which is how the README's pictures are made.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser_util import browser, wait_until  # noqa: F401  (the fixture)
from tests.stack import Stack, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration

GREET = (
    "def handler(context, event):\n"
    "    who = event.body.decode() if isinstance(event.body, bytes) else str(event.body)\n"
    "    context.logger.info('greeted ' + who)\n"
    "    return 'hello ' + who\n"
)
BROKEN = "def handler(context, event):\n    return 'never'\n\nraise ImportError('this module is broken on purpose')\n"
FAILING = "def handler(context, event):\n    raise ValueError('fails on purpose')\n"
RETRY = {"maxAttempts": 2, "backoff": {"initial": "100ms", "max": "200ms", "multiplier": 2}}
CALLEE = "def handler(context, event):\n    return 'ok'\n"
CALLER = "def handler(context, event):\n    context.call('uicallee', {'n': 1})\n    return 'called'\n"
# a drop as a user's makes it: a File from the zip's bytes, in a DataTransfer, on drag events at the zone
DROP_JS = """
const [b64, fileName] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], fileName, {type: "application/zip"}));
const zone = document.getElementById("dropzone");
for (const type of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
}
"""


def screenshot(driver: Any, tmp_path: Path, page: str, readme: bool = True) -> None:
    target = tmp_path / "screenshots"
    target.mkdir(exist_ok=True)
    driver.save_screenshot(str(target / f"{page}.png"))
    copy_to = os.environ.get("NUCLIDE_SCREENSHOT_DIR")
    if copy_to and readme:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(target / f"{page}.png", Path(copy_to) / f"{page}.png")


def text_of(driver: Any, css: str) -> str:
    return wait_until(driver, lambda d: d.find_element("css selector", css).text or " ", css).strip()


def click(driver: Any, css: str, what: str) -> None:
    """Click ``css`` once it is there (tried again while the page redraws it)."""
    wait_until(driver, lambda d: d.find_element("css selector", css).click() or True, what)


def shows(css: str, *needles: str) -> Any:
    """A wait condition: the element at ``css`` shows every one of ``needles``."""
    return lambda d: all(n in d.find_element("css selector", css).text for n in needles)


def log_in(driver: Any, stack: Stack) -> None:
    driver.get(f"{stack.url}/ui")
    wait_until(driver, lambda d: d.find_element("id", "token").is_displayed(), "the login form")
    driver.find_element("id", "token").send_keys(stack.token)
    driver.find_element("css selector", "#login-form button").click()
    wait_until(driver, lambda d: d.find_element("id", "deploy-form").is_displayed(), "the functions page")


def log_followers(stack: Stack) -> float:
    """The gateway's open log-following responses (nuclide_log_followers)."""
    return stack.metrics()["nuclide_log_followers"]


def same_origin_only(driver: Any, origin: str) -> list[str]:
    """What the page loaded from anywhere but the gateway."""
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [url for url in loaded if not url.startswith(origin + "/")]


def test_dashboard_deploys_invokes_follows_logs_and_redrives(stack: Stack, browser: Any, tmp_path: Path) -> None:
    d = browser
    zip_path = tmp_path / "uigreet.zip"
    zip_path.write_bytes(make_zip({"function.yaml": function_yaml("uigreet"), "main.py": GREET}))
    broken_path = tmp_path / "uibroken.zip"
    broken_path.write_bytes(make_zip({"function.yaml": function_yaml("uibroken"), "main.py": BROKEN}))

    # log in: a wrong token is refused on the form, the right one opens the functions page
    d.get(f"{stack.url}/ui")
    wait_until(d, lambda d: d.find_element("id", "token").is_displayed(), "the login form")
    screenshot(d, tmp_path, "login")
    d.find_element("id", "token").send_keys("not-the-token")
    d.find_element("css selector", "#login-form button").click()
    wait_until(d, shows("#login-error", "refused"), "the wrong token to be refused")
    d.find_element("id", "token").clear()
    d.find_element("id", "token").send_keys(stack.token)
    d.find_element("css selector", "#login-form button").click()
    wait_until(d, lambda d: d.find_element("id", "deploy-form").is_displayed(), "the functions page")
    assert d.execute_script("return sessionStorage.getItem('nuclide.token')") == stack.token

    # deploy through the page (file input: the drop zone's own picker), then see it listed
    d.find_element("id", "deploy-name").send_keys("uigreet")
    d.find_element("id", "zip-file").send_keys(str(zip_path))
    d.find_element("id", "deploy-button").click()
    wait_until(d, shows("#deploy-result", "uigreet version 1 is ready"), "the deploy to finish")
    wait_until(d, shows("tr[data-function=uigreet]", "ready", "1/1"), "uigreet in the list")
    assert stack.client.get("/functions/uigreet").json()["state"] == "ready"

    # a zip whose handler cannot be imported: the page shows the error and the build log
    d.find_element("id", "deploy-name").clear()
    d.find_element("id", "deploy-name").send_keys("uibroken")
    d.find_element("id", "zip-file").send_keys(str(broken_path))
    d.find_element("id", "deploy-button").click()
    wait_until(d, shows("#build-log", "this module is broken on purpose"), "the failed deploy's build log")
    screenshot(d, tmp_path, "functions-failed", readme=False)  # the README's is the streaming deploy's below

    # one function: invoke it from the playground, see the answer, its log line, and the call
    click(d, "tr[data-function=uigreet] a", "the link to uigreet")
    wait_until(d, shows("#function-facts", "ready", "main:handler"), "uigreet's description")
    d.find_element("id", "invoke-body").send_keys("world")
    d.find_element("id", "invoke-button").click()
    wait_until(d, shows("#invoke-result", "hello world"), "the invocation's answer")
    assert text_of(d, "#invoke-status") == "200"
    wait_until(d, shows("#function-logs", "greeted world"), "the handler's log line")
    wait_until(d, shows("#function-calls", "uigreet", "DONE"), "the call in the recent calls")
    screenshot(d, tmp_path, "function")

    # a dead letter: a function that always fails, called async, runs out of attempts
    stack.deploy("uidead", {"function.yaml": function_yaml("uidead", retry=RETRY), "main.py": FAILING})
    call_id = stack.invoke("uidead", "x", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    dead = wait_for(lambda: (c := stack.client.get(f"/calls/{call_id}").json())["status"] == "DEAD" and c, 60,
                    what="the async call to become a dead letter")
    assert dead["attempts"] == 2

    # the calls page: filter by DEAD, inspect it, redrive it, and watch its attempts start over and grow
    d.find_element("css selector", "nav a[data-page=calls]").click()
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "calls-status")).select_by_value("DEAD")
    click(d, f"tr[data-call='{call_id}']", "the dead letter in the list")
    wait_until(d, shows("#call-detail", "DEAD", "2/2", "fails on purpose"), "the dead letter's record")
    finished_before = text_of(d, "#call-finished")
    click(d, "#redrive", "the redrive button")
    wait_until(d, shows("#redrive-result", f"{call_id} is PENDING, attempt 0/2"), "the redrive's answer")
    wait_until(d, lambda d: (shows("#call-detail", "DEAD", "2/2")(d)
                             and text_of(d, "#call-finished") not in ("-", finished_before)),
               "the redriven call to run both attempts again and die")
    assert stack.client.get(f"/calls/{call_id}").json()["attempts"] == 2
    screenshot(d, tmp_path, "calls")

    # fusion and runtimes: what GET /groups, /optimizer and /runtimes say
    d.find_element("css selector", "nav a[data-page=fusion]").click()
    wait_until(d, shows("#groups", "uigreet", "uidead"), "the groups in force")
    wait_until(d, lambda d: d.find_element("id", "optimizer").text.strip() != "", "the optimizer's state")
    screenshot(d, tmp_path, "fusion-no-calls", readme=False)  # the README's shows a call graph (below)
    d.find_element("css selector", "nav a[data-page=runtimes]").click()
    wait_until(d, shows("#runtime-list", "built-in Python runtime"), "the runtimes page")
    screenshot(d, tmp_path, "runtimes")

    # delete from the functions page (it asks first)
    d.find_element("css selector", "nav a[data-page=functions]").click()
    click(d, "tr[data-function=uibroken] button.danger", "uibroken's delete button")
    wait_until(d, lambda d: d.switch_to.alert, "the confirmation").accept()
    wait_until(d, lambda d: not d.find_elements("css selector", "tr[data-function=uibroken]"), "uibroken to go")
    assert stack.client.get("/functions/uibroken").status_code == 404

    assert same_origin_only(d, stack.url) == [], "the dashboard loaded something from elsewhere"
    # logging out forgets the token
    d.find_element("id", "logout").click()
    wait_until(d, lambda d: d.find_element("id", "token").is_displayed(), "the login form after logging out")
    assert d.execute_script("return sessionStorage.getItem('nuclide.token')") is None


def test_api_docs_render_offline_in_the_browser(stack: Stack, browser: Any, tmp_path: Path) -> None:
    d = browser
    d.get(f"{stack.url}/docs")
    wait_until(d, lambda d: len(d.find_elements("css selector", ".opblock")) >= 30, "Swagger UI's operations")
    assert "/functions/{name}/invoke" in d.find_element("tag name", "body").text
    assert same_origin_only(d, stack.url) == [], "/docs loaded something from elsewhere"
    screenshot(d, tmp_path, "docs")


def test_function_page_follows_its_logs_live_and_stops_when_left(stack: Stack, browser: Any, tmp_path: Path) -> None:
    d = browser
    stack.deploy("uifollow", {"function.yaml": function_yaml("uifollow"), "main.py": GREET})
    wait_for(lambda: log_followers(stack) == 0, 30, what="no log follower open before the page")
    log_in(d, stack)
    d.get(f"{stack.url}/ui/#/function/uifollow")
    wait_until(d, shows("#logs-state", "following"), "the page to follow the logs")
    wait_for(lambda: log_followers(stack) == 1, 30, what="the page's stream open on the gateway")
    d.execute_script("window.notReloaded = true")

    # a line written after the page opened shows without a reload, once
    first = f"first-{time.monotonic_ns()}"
    assert stack.invoke("uifollow", first).text == f"hello {first}"
    wait_until(d, shows("#function-logs", f"greeted {first}"), "the line logged after the page opened")
    assert d.execute_script("return window.notReloaded") is True
    screenshot(d, tmp_path, "function-following", readme=False)

    # "follow" unticked closes the stream; ticked again, it goes on from the last line: what was logged
    # meanwhile shows, nothing twice
    d.find_element("id", "follow-logs").click()
    wait_for(lambda: log_followers(stack) == 0, 30, what="the stream to close when follow is unticked")
    meanwhile = f"meanwhile-{time.monotonic_ns()}"
    stack.invoke("uifollow", meanwhile)
    assert f"greeted {meanwhile}" not in d.find_element("id", "function-logs").text
    d.find_element("id", "follow-logs").click()
    wait_until(d, shows("#function-logs", f"greeted {meanwhile}"), "the line logged while not following")
    wait_for(lambda: log_followers(stack) == 1, 30, what="the stream open again")
    text = d.find_element("id", "function-logs").text
    assert text.count(f"greeted {first}") == 1 and text.count(f"greeted {meanwhile}") == 1, text[-2000:]

    # leaving the page (for another page of the dashboard) closes the stream on the gateway
    d.find_element("css selector", "nav a[data-page=calls]").click()
    wait_until(d, lambda d: d.find_element("id", "call-list"), "the calls page")
    wait_for(lambda: log_followers(stack) == 0, 30, what="the stream to close when the page is left")


def test_logs_follow_again_after_the_gateway_restarts(fresh_stack: Stack, browser: Any) -> None:
    s, d = fresh_stack, browser
    s.deploy("uirestart", {"function.yaml": function_yaml("uirestart"), "main.py": GREET})
    log_in(d, s)
    d.get(f"{s.url}/ui/#/function/uirestart")
    wait_until(d, shows("#logs-state", "following"), "the page to follow the logs")
    before = f"before-{time.monotonic_ns()}"
    s.invoke("uirestart", before)
    wait_until(d, shows("#function-logs", f"greeted {before}"), "the line logged before the drop")

    s.stop_service("gateway", signal.SIGKILL)  # the stream drops without an end
    wait_until(d, shows("#logs-state", "reconnecting"), "the page to notice the drop")
    s.start_service("gateway")
    s.wait_healthy()
    after = f"after-{time.monotonic_ns()}"
    wait_for(lambda: s.invoke("uirestart", after).status_code == 200, 60, what="the instance back on the gateway")
    wait_until(d, shows("#function-logs", f"greeted {after}"), "the line logged after the gateway came back")
    text = d.find_element("id", "function-logs").text
    # followed again from the last line's time: that line is not shown twice
    assert text.count(f"greeted {before}") == 1, text[-2000:]
    assert shows("#logs-state", "following")(d)


def test_a_dropped_zip_deploys_with_its_build_output_streaming(stack: Stack, browser: Any, tmp_path: Path) -> None:
    d = browser
    marker = f"build-step-{time.monotonic_ns()}"
    # the step prints, then waits for a file only this test writes once the page showed the line: so the line
    # came while the deploy still ran, not with its answer
    gate = stack.var_dir.resolve() / "cache" / "pip" / f"{marker}.gate"  # a folder a build step may see
    spec = function_yaml("uidropped", build={"commands": [
        f"echo {marker}; i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"]})
    zip_bytes = make_zip({"function.yaml": spec, "main.py": GREET})
    log_in(d, stack)
    try:
        d.execute_script(DROP_JS, base64.b64encode(zip_bytes).decode(), "uidropped.zip")
        wait_until(d, lambda d: any(marker in ln and "echo" not in ln
                                    for ln in d.find_element("id", "build-log").text.splitlines()),
                   "the build step's line while the deploy runs")
        assert "building" in d.find_element("id", "deploy-state").text, "the deploy was still waiting for its build"
        assert d.find_element("id", "deploy-name").get_attribute("value") == "uidropped"
    finally:
        gate.touch()  # the build finishes (or the test's failure does not leave it hanging)
    wait_until(d, shows("#deploy-state", "uidropped version 1 is ready"), "the deploy's final state")
    wait_until(d, shows("tr[data-function=uidropped]", "ready", "1/1"), "uidropped in the list")
    lines = d.find_element("id", "build-log").text.splitlines()
    assert sum(marker in ln and "echo" not in ln for ln in lines) == 1, "the line is shown once"
    assert stack.client.get("/functions/uidropped").json()["state"] == "ready"
    assert stack.invoke("uidropped", "drop").text == "hello drop"
    wait_for(lambda: log_followers(stack) == 0, 30, what="the deploy's log stream to close once it answered")
    screenshot(d, tmp_path, "functions")

    # a dropped file that is no zip: the gateway's reason shows, and nothing is deployed
    d.find_element("id", "deploy-name").clear()
    d.execute_script(DROP_JS, base64.b64encode(b"just some notes").decode(), "uinotes.zip")
    wait_until(d, shows("#deploy-state", "the upload is not a zip archive"), "the refused drop's reason")
    assert stack.client.get("/functions/uinotes").status_code == 404
    wait_for(lambda: log_followers(stack) == 0, 30, what="the refused deploy's log stream to close")


def test_fusion_page_draws_the_call_graph_with_fused_and_remote_counts(fresh_stack: Stack, browser: Any,
                                                                       tmp_path: Path) -> None:
    s, d = fresh_stack, browser
    s.deploy("uicallee", {"function.yaml": function_yaml("uicallee"), "main.py": CALLEE})
    s.deploy("uicaller", {"function.yaml": function_yaml("uicaller"), "main.py": CALLER})
    for _ in range(3):  # in groups of their own: through the gateway
        assert s.invoke("uicaller").text == "called"
    r = s.client.put("/groups", json=[["uicallee", "uicaller"]])
    assert r.status_code == 200, r.text
    groups = wait_for(lambda: (g := s.client.get("/groups").json())["regroup"]["state"] != "deploying" and g, 120,
                      what="the regroup to end")
    assert groups["regroup"]["state"] == "done", groups["regroup"]
    for _ in range(2):  # fused: in-process
        assert s.invoke("uicaller").text == "called"

    log_in(d, s)
    d.find_element("css selector", "nav a[data-page=fusion]").click()
    row = "#call-graph-table tr[data-edge='uicaller->uicallee']"
    wait_until(d, lambda d: (d.find_element("css selector", f"{row} td.calls").text == "5"), "the edge's 5 calls")
    assert d.find_element("css selector", f"{row} td.fused").text == "2"
    assert d.find_element("css selector", f"{row} td.remote").text == "3"
    edge = d.find_element("css selector", "#call-graph svg g.edge[data-edge='uicaller->uicallee']")
    assert (edge.get_attribute("data-calls"), edge.get_attribute("data-fused")) == ("5", "2")
    assert [t.text for t in edge.find_elements("tag name", "text")] == ["5 calls", "2 fused · 3 remote"]
    nodes = {n.get_attribute("data-node") for n in d.find_elements("css selector", "#call-graph svg g.node")}
    assert nodes == {"uicaller", "uicallee"}
    # the same numbers as the API's
    graph = s.client.get("/optimizer").json()["graph"]
    assert [(e["caller"], e["callee"], e["calls"], e["fused"]) for e in graph] == [("uicaller", "uicallee", 5, 2)]
    screenshot(d, tmp_path, "fusion")
