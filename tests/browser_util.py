"""A real headless Chromium driven by Selenium, for tests of the web pages.

Debian's ``chromium`` and ``chromium-driver`` (CI installs them); nothing is downloaded:
the driver is named explicitly, so Selenium Manager never looks for one online. Tests
that take the ``browser`` fixture skip with the reason when either is missing, and fail
instead under ``NUCLIDE_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REQUIRE_ENV = "NUCLIDE_REQUIRE_BROWSER"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1200,860")
WAIT_S = 60.0  # a deploy through the page waits for the build; everything else is quicker


def missing_reason() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    for binary in ("chromium", "chromedriver"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed: apt-get install chromium chromium-driver"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"a browser is required here ({REQUIRE_ENV}=1) but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=shutil.which("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """``condition(driver)`` once it is truthy; fails naming ``what`` and the page's text after the deadline."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # pages redraw what they refresh: an element found a moment ago may be gone, so the condition is asked again
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        text = driver.find_element("tag name", "body").text
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; the page shows:\n{text[-3000:]}") from None
