"""The web dashboard at /ui in a real headless Chromium: log in, deploy, invoke, read logs, redrive a dead letter.

Each page's screenshot is saved under the test's temporary directory; with
NUCLIDE_SCREENSHOT_DIR set (e.g. to docs/screenshots) they are copied there too, which is
how the README's pictures are made.
"""

from __future__ import annotations

import os
import shutil
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


def screenshot(driver: Any, tmp_path: Path, page: str) -> None:
    target = tmp_path / "screenshots"
    target.mkdir(exist_ok=True)
    driver.save_screenshot(str(target / f"{page}.png"))
    copy_to = os.environ.get("NUCLIDE_SCREENSHOT_DIR")
    if copy_to:
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
    screenshot(d, tmp_path, "functions")

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
    screenshot(d, tmp_path, "fusion")
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
