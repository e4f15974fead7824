"""An operator reads the console's charts in a real browser at 1,280 px: the fleet dashboard
(the console's home), a machine's page and a lease's page, after a short simulated run. Each
chart has data points, nothing is wider than the window, and a screenshot of each page is
saved under var/screenshots/ (CI keeps var/ as an artifact)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from billing.models import LedgerEntry
from billing.services import Leg, job_budget_reserve, job_reserved, lease_unsettled, ledger_post
from jobs.models import Lease
from jobs.services import lease_end
from providers.models import GPU, Machine, TelemetrySample
from providers.telemetry import telemetry_rollup
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory, fund, placed_lease

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct horse battery staple"
WAIT_S = 10
WIDTH = 1280
SCREENSHOTS = settings.VAR_DIR / "screenshots"
RUN = timedelta(hours=3)


def wait_for_page(driver: webdriver.Chrome) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.readyState") == "complete")


def open_page(driver: webdriver.Chrome, live_server, path: str) -> None:  # type: ignore[no-untyped-def]
    driver.get(live_server.url + path)
    wait_for_page(driver)


@pytest.fixture
def console(browser, live_server, settings) -> Iterator[webdriver.Chrome]:  # type: ignore[no-untyped-def]
    """The browser at 1,280 px wide, logged in as a staff superuser through the login form."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("olga", "olga@example.org", PASSWORD)
    size = browser.get_window_size()
    browser.set_window_size(WIDTH, 1000)
    open_page(browser, live_server, reverse("admin:login"))
    browser.find_element(By.ID, "id_username").send_keys("olga")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "user-tools"))
    try:
        yield browser
    finally:
        browser.set_window_size(size["width"], size["height"])


@pytest.fixture
def simulated_run() -> tuple[Machine, Lease]:
    """Three hours of a two-GPU machine's minute samples (GPU 0 leased for the last two hours,
    GPU 1 for the first hour and a half, until its owner reclaims it), rolled up by the real rollup service; a charge in
    the ledger; a job still waiting."""
    now = timezone.now()
    machine = MachineFactory(hostname="rig-charts", region="eu-west", provider=ProviderFactory())
    leased_gpu, idle_gpu = (GPUFactory(machine=machine, index=i, model="RTX 4090") for i in range(2))
    reclaimed = placed_lease(gpus=[idle_gpu], started=now - RUN)
    lease_end(lease_id=reclaimed.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="machine:1", at=now - RUN / 2)
    job = JobFactory(name="train-charts")
    fund(job.renter, 10_000_000)
    job_budget_reserve(job=job)
    lease = placed_lease(job=job, gpus=[leased_gpu], started=now - timedelta(hours=2))
    ledger_post(
        kind=LedgerEntry.Kind.CHARGE,
        idempotency_key=f"charge:{lease.pk}:browser",
        legs=[Leg(job_reserved(job.pk), -200_000), Leg(lease_unsettled(lease.pk), 200_000)],
        job_id=job.pk,
        lease_id=lease.pk,
    )
    JobFactory(name="still-waiting")
    samples = []
    for minute in range(int(RUN.total_seconds() // 60)):
        at = now - RUN + timedelta(minutes=minute)
        # GPU 0 is leased for the last two hours; GPU 1 for the first half of the run, until its
        # owner reclaims it.
        for gpu, busy in ((leased_gpu, at >= lease.started_at), (idle_gpu, at < now - RUN / 2)):  # type: ignore[operator]
            samples.append(
                TelemetrySample(
                    gpu=gpu,
                    at=at,
                    utilization_pct=70 + 25 * math.sin(minute / 9) if busy else 2.0,
                    memory_used_mb=18_000 if busy else 400,
                    temperature_c=70.0 if busy else 38.0,
                    power_w=320.0 if busy else 30.0,
                    state=GPU.State.LEASED if busy else GPU.State.IDLE,
                )
            )
    TelemetrySample.objects.bulk_create(samples)
    assert telemetry_rollup(now=now, since=now - RUN) > 0
    return machine, lease


def points_per_chart(driver: webdriver.Chrome, scope: str) -> list[int]:
    charts = driver.find_elements(By.CSS_SELECTOR, f"{scope} svg.chart")
    return [len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) for chart in charts]


def overflowing(driver: webdriver.Chrome) -> list[str]:
    """What is wider than the window: the page itself, or a list/table box that is cut off
    rather than scrolling within itself."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const out = [];
        const doc = document.documentElement;
        if (doc.scrollWidth > doc.clientWidth) out.push(`document ${doc.scrollWidth} > ${doc.clientWidth}`);
        for (const el of document.querySelectorAll('#content, #content-main, .results, .console-table, svg.chart')) {
            const r = el.getBoundingClientRect();
            const name = el.id || el.className.baseVal || el.className;
            if (r.right > doc.clientWidth + 1) out.push(`${name} ends at ${r.right}`);
        }
        return out;
        """
    )


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # The whole page, not only the window: set the window as tall as the page for the shot.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(max(height + 120, 1000), 6000))
    assert driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, 1000)
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


def test_dashboard_charts_the_simulated_run_and_fits_1280_px(console, live_server, simulated_run) -> None:  # type: ignore[no-untyped-def]
    open_page(console, live_server, reverse("admin:index") + "?range=day")

    assert console.execute_script("return window.innerWidth") <= WIDTH
    dashboard = console.find_element(By.ID, "fleet-dashboard")
    assert "Fleet, last day" in dashboard.text
    assert "times in UTC" in dashboard.text
    points = points_per_chart(console, "#fleet-dashboard")
    assert len(points) == 4 and all(n > 0 for n in points), points
    assert console.find_element(By.ID, "figure-placements").text == "2"
    assert console.find_element(By.ID, "figure-preemptions").text == "1 (1)"
    assert console.find_element(By.ID, "figure-revenue").text == "0.200000"
    # Hovering a point reads its value: each point carries a title.
    first = dashboard.find_element(By.CSS_SELECTOR, "svg.chart circle.point title")
    assert "UTC" in first.get_attribute("textContent")
    assert overflowing(console) == []
    screenshot(console, "dashboard")

    for range_name in ("hour", "week"):
        open_page(console, live_server, reverse("admin:index") + f"?range={range_name}")
        assert all(n > 0 for n in points_per_chart(console, "#fleet-dashboard")), range_name
        assert overflowing(console) == []


def test_machine_page_charts_each_gpu(console, live_server, simulated_run) -> None:  # type: ignore[no-untyped-def]
    machine, _ = simulated_run
    open_page(console, live_server, reverse("admin:providers_machine_change", args=[machine.pk]))

    charts = console.find_elements(By.CSS_SELECTOR, ".field-telemetry svg.chart")
    assert [c.find_element(By.TAG_NAME, "title").get_attribute("textContent") for c in charts] == [
        "Utilisation",
        "Memory used",
        "Temperature",
        "Power",
    ]
    for chart in charts:
        names = {g.get_attribute("data-series") for g in chart.find_elements(By.CSS_SELECTOR, "g.series")}
        assert names == {"GPU 0 (RTX 4090)", "GPU 1 (RTX 4090)"}
        # The page spans 24 hours in 120 buckets of 12 minutes: 3 hours of samples fill 15 a GPU.
        for series in chart.find_elements(By.CSS_SELECTOR, "g.series"):
            assert len(series.find_elements(By.CSS_SELECTOR, "circle.point")) >= 15
    # Times to the second with the zone.
    created = console.find_element(By.CSS_SELECTOR, ".field-created_at .readonly").text
    assert created.endswith(" UTC") and created.count(":") == 2
    assert overflowing(console) == []
    screenshot(console, "machine")


def test_lease_page_charts_its_gpus_over_the_lease(console, live_server, simulated_run) -> None:  # type: ignore[no-untyped-def]
    _, lease = simulated_run
    open_page(console, live_server, reverse("admin:jobs_lease_change", args=[lease.pk]))

    (chart,) = console.find_elements(By.CSS_SELECTOR, ".field-gpu_utilisation svg.chart")
    assert [g.get_attribute("data-series") for g in chart.find_elements(By.CSS_SELECTOR, "g.series")] == [
        "GPU 0 (RTX 4090)"
    ]
    titles = [t.get_attribute("textContent") for t in chart.find_elements(By.CSS_SELECTOR, "circle.point title")]
    assert len(titles) > 50
    # Over the lease only: the GPU was leased, so busy, at every point.
    assert all(float(t.rsplit(": ", 1)[1].split()[0]) > 40 for t in titles)
    assert overflowing(console) == []
    screenshot(console, "lease")


@pytest.mark.parametrize("changelist", ["providers_machine", "providers_gpu", "jobs_job", "jobs_lease"])
def test_list_tables_are_not_cut_off_at_1280_px(console, live_server, simulated_run, changelist) -> None:  # type: ignore[no-untyped-def]
    open_page(console, live_server, reverse(f"admin:{changelist}_changelist"))

    assert console.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert overflowing(console) == []
    # A table wider than its box scrolls inside the box: its last column can be reached.
    box = console.find_element(By.CSS_SELECTOR, "#changelist .results")
    assert box.value_of_css_property("overflow-x") == "auto"
    screenshot(console, f"list-{changelist}")
