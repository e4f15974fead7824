"""A real headless Chromium for the operator console tests, one per test session.

Chromium and its ChromeDriver come from the system (Debian's `chromium` and `chromium-driver`,
installed by scripts/install-browser); Selenium drives them. Without them the tests are
skipped on a developer's machine, and fail in CI (where the CI variable is set), so a CI
without a browser cannot pass by running none of them.

Set BROWSER_ARTIFACTS_DIR to keep what the browser saw: a failing test leaves a screenshot
and the page's HTML there (a temporary folder otherwise).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, and nothing that reaches outside the machine: only the live server is reachable.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests may run as root (CI, containers)
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",  # containers give /dev/shm little room
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1400,1000",
)
PAGE_LOAD_TIMEOUT_S = 30


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, from CHROMIUM_BINARY / CHROMEDRIVER or the PATH; None
    when either is missing."""
    browser = os.environ.get("CHROMIUM_BINARY") or next(filter(None, map(shutil.which, BROWSER_NAMES)), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if browser and driver and os.access(browser, os.X_OK) and os.access(driver, os.X_OK):
        return browser, driver
    return None


@pytest.fixture(scope="session")
def browser_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: BROWSER_ARTIFACTS_DIR, or a temporary folder."""
    wanted = os.environ.get("BROWSER_ARTIFACTS_DIR")
    if not wanted:
        return tmp_path_factory.mktemp("browser")
    path = Path(wanted)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def chromium(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, live_server
) -> Iterator[webdriver.Chrome]:  # type: ignore[no-untyped-def]
    """One headless Chromium for the whole session, with a fresh profile.

    It depends on the test database and the live server so that it quits before either is
    torn down: Chromium keeps HTTP connections alive, and each one holds a server thread and
    that thread's database connection open (PostgreSQL then refuses to drop the test database).
    """
    found = find_chromium()
    if found is None:
        reason = "no Chromium and ChromeDriver found (install them with scripts/install-browser)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the browser tests", pytrace=False)
        pytest.skip(reason)
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # Both paths are given, so Selenium never tries to download a driver.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        # Its connections are closed now: let the server threads that served them finish,
        # closing their database connections (socketserver names them after their target).
        for thread in threading.enumerate():
            if thread.name.endswith("(process_request_thread)"):
                thread.join(timeout=5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Keep each phase's report on the item, so the browser fixture knows a test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def browser(
    chromium: webdriver.Chrome, live_server, browser_artifacts: Path, request: pytest.FixtureRequest
) -> Iterator[webdriver.Chrome]:
    """The session's browser with no cookies: each test starts logged out. On failure the
    page is saved (screenshot and HTML) under browser_artifacts."""
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    yield chromium
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        stem = browser_artifacts / request.node.name
        chromium.save_screenshot(str(stem.with_suffix(".png")))
        stem.with_suffix(".html").write_text(chromium.page_source, encoding="utf-8")
    # Leave no page open on the live server: the next test's database is a new one.
    chromium.get("about:blank")
