"""An operator uses the console (/admin/) in a real browser: logs in, finds machines, suspends
one, cancels a job, issues a registration token, reads a job's audit trail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.urls import reverse
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from jobs.models import Event, Job, Lease
from providers.models import GPU, Machine, RegistrationToken
from providers.services import secret_digest
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory, placed_lease

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct horse battery staple"
APPS = ("accounts", "providers", "jobs", "billing")
WAIT_S = 10


# --- what the operator does, in browser terms ------------------------------------------------


def wait_for_page(driver: webdriver.Chrome) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _gone(element: WebElement) -> bool:
    """The element's page has been replaced. Chrome answers a node of a page being torn down
    with "does not belong to the document" rather than a stale reference (seen under load);
    both mean the old page is gone."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in (exc.msg or ""):
            return True
        raise
    return False


def click_and_wait(driver: webdriver.Chrome, element: WebElement) -> None:
    """Click something that loads a new page, and wait until that page has loaded."""
    old_page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, WAIT_S).until(lambda _: _gone(old_page))
    wait_for_page(driver)


def open_page(driver: webdriver.Chrome, live_server, path: str) -> None:  # type: ignore[no-untyped-def]
    driver.get(live_server.url + path)
    wait_for_page(driver)


def log_in(driver: webdriver.Chrome, username: str, password: str) -> None:
    """Fill in and send the login form on the current page."""
    driver.find_element(By.ID, "id_username").clear()
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    click_and_wait(driver, driver.find_element(By.CSS_SELECTOR, "#login-form [type=submit]"))


def shown_messages(driver: webdriver.Chrome) -> list[str]:
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]


def listed(driver: webdriver.Chrome, column: str) -> list[str]:
    """The values of one column of a change list, top to bottom."""
    return [td.text for td in driver.find_elements(By.CSS_SELECTOR, f"#result_list tbody .field-{column}")]


def row_of(driver: webdriver.Chrome, pk: int) -> WebElement:
    return driver.find_element(By.XPATH, f"//input[@name='_selected_action' and @value='{pk}']/ancestor::tr")


def run_action(driver: webdriver.Chrome, label: str, pks: list[int]) -> None:
    """Tick the rows, pick the action by its label, press Go (and confirm, if asked)."""
    for pk in pks:
        checkbox = row_of(driver, pk).find_element(By.NAME, "_selected_action")
        checkbox.click()
        assert checkbox.is_selected()
    Select(driver.find_element(By.NAME, "action")).select_by_visible_text(label)
    click_and_wait(driver, driver.find_element(By.XPATH, "//div[@class='actions']//button[normalize-space()='Go']"))
    # An action that asks first shows Django's "Are you sure?" page with a post=yes form.
    confirm = driver.find_elements(By.CSS_SELECTOR, "form input[name=post][value=yes]")
    if confirm:
        click_and_wait(driver, confirm[0].find_element(By.XPATH, "ancestor::form//*[@type='submit']"))


# --- data -------------------------------------------------------------------------------------


@pytest.fixture
def operator(settings):  # type: ignore[no-untyped-def]
    """A staff superuser with a known password (a fast hasher: the server runs in-process)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return get_user_model().objects.create_superuser("olga", "olga@example.org", PASSWORD)


@pytest.fixture
def console(browser, live_server, operator) -> webdriver.Chrome:  # type: ignore[no-untyped-def]
    """The browser, logged in as the operator through the login form."""
    open_page(browser, live_server, reverse("admin:login"))
    log_in(browser, operator.username, PASSWORD)
    assert browser.find_elements(By.ID, "user-tools"), "the operator should be logged in"
    return browser


def machine_with(hostname: str, *, gpus: int, status: str = Machine.Status.ONLINE) -> Machine:
    machine = MachineFactory(hostname=hostname, status=status, provider=ProviderFactory())
    for index in range(gpus):
        GPUFactory(machine=machine, index=index)
    return machine


# --- tests ------------------------------------------------------------------------------------


def test_operator_logs_in_through_the_form_and_sees_every_part_of_the_marketplace(
    browser, live_server, operator
) -> None:  # type: ignore[no-untyped-def]
    open_page(browser, live_server, reverse("admin:index"))
    assert browser.current_url.startswith(live_server.url + reverse("admin:login")), "sent to log in first"

    log_in(browser, operator.username, "not the password")
    assert "Please enter the correct username and password" in browser.find_element(By.CLASS_NAME, "errornote").text

    log_in(browser, operator.username, PASSWORD)

    assert browser.current_url == live_server.url + reverse("admin:index")
    assert browser.find_element(By.ID, "site-name").text == "GPGPU operator console"
    # The console's stylesheets were served: the header is coloured, not the browser default.
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert "OLGA" in browser.find_element(By.ID, "user-tools").text.upper()
    links = {a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#content-main a")}
    for model in admin.site._registry:
        if model._meta.app_label in APPS:
            changelist = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
            assert live_server.url + changelist in links, f"{model.__name__} missing from the index"


def test_operator_filters_and_searches_machines_and_sees_their_gpu_counts(
    console, live_server, browser_artifacts: Path
) -> None:  # type: ignore[no-untyped-def]
    machine_with("rig-alpha", gpus=2)
    machine_with("rig-beta", gpus=1)
    machine_with("rig-gamma", gpus=4, status=Machine.Status.OFFLINE)

    # From the index, as an operator would get there.
    click_and_wait(console, console.find_element(By.LINK_TEXT, "Machines"))

    assert console.find_element(By.CSS_SELECTOR, "#result_list th.column-gpu_count").text.upper() == "GPUS"
    shown = dict(zip(listed(console, "hostname"), listed(console, "gpu_count"), strict=True))
    assert shown == {"rig-alpha": "2", "rig-beta": "1", "rig-gamma": "4"}
    screenshot = browser_artifacts / "machines-list.png"
    assert console.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    status_filter = "//nav[@id='changelist-filter']//details[@data-filter-title='status']"
    click_and_wait(console, console.find_element(By.XPATH, f"{status_filter}//a[normalize-space()='Offline']"))
    assert listed(console, "hostname") == ["rig-gamma"]
    assert listed(console, "status") == ["Offline"]

    click_and_wait(console, console.find_element(By.XPATH, f"{status_filter}//a[normalize-space()='All']"))
    console.find_element(By.ID, "searchbar").send_keys("rig-beta")
    click_and_wait(console, console.find_element(By.CSS_SELECTOR, "#changelist-search [type=submit]"))
    assert listed(console, "hostname") == ["rig-beta"]
    assert listed(console, "gpu_count") == ["1"]


def test_suspending_a_busy_machine_ends_its_lease_and_puts_the_job_back_in_the_queue(console, live_server) -> None:  # type: ignore[no-untyped-def]
    busy = machine_with("rig-busy", gpus=2)
    idle = machine_with("rig-idle", gpus=1)
    job = JobFactory(name="train-resnet", interruptible=True)
    lease = placed_lease(job=job, machine=busy, started=True)
    open_page(console, live_server, reverse("admin:providers_machine_changelist"))

    run_action(console, "Suspend selected machines", [busy.pk])

    assert console.current_url.startswith(live_server.url + reverse("admin:providers_machine_changelist"))
    assert "Suspended 1 machine(s); 1 active lease(s) ended." in shown_messages(console)
    assert row_of(console, busy.pk).find_element(By.CSS_SELECTOR, ".field-status").text == "Suspended"
    assert row_of(console, idle.pk).find_element(By.CSS_SELECTOR, ".field-status").text == "Online"
    lease.refresh_from_db()
    job.refresh_from_db()
    busy.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, Lease.EndReason.MACHINE_SUSPENDED)
    assert lease.ended_at is not None
    assert job.status == Job.Status.PENDING
    assert busy.status == Machine.Status.SUSPENDED
    assert set(busy.gpus.values_list("state", flat=True)) == {GPU.State.OFFLINE}
    assert Machine.objects.get(pk=idle.pk).status == Machine.Status.ONLINE


def test_operator_cancels_a_pending_job_from_the_job_list(console, live_server) -> None:  # type: ignore[no-untyped-def]
    waiting = JobFactory(name="waiting-job")
    other = JobFactory(name="other-job")
    open_page(console, live_server, reverse("admin:jobs_job_changelist"))

    run_action(console, "Cancel selected jobs", [waiting.pk])

    assert "Cancelled 1 job(s)." in shown_messages(console)
    assert row_of(console, waiting.pk).find_element(By.CSS_SELECTOR, ".field-status").text == "Cancelled"
    assert row_of(console, other.pk).find_element(By.CSS_SELECTOR, ".field-status").text == "Pending"
    waiting.refresh_from_db()
    other.refresh_from_db()
    assert waiting.status == Job.Status.CANCELLED
    assert other.status == Job.Status.PENDING
    assert Event.objects.filter(job=waiting, kind="job.cancelled", actor__startswith="operator:").exists()


def test_registration_token_is_shown_once_after_the_add_form(console, live_server) -> None:  # type: ignore[no-untyped-def]
    provider = ProviderFactory(display_name="Ada's GPUs")
    open_page(console, live_server, reverse("admin:providers_registrationtoken_add"))

    console.find_element(By.ID, "id_provider").send_keys(str(provider.pk))
    console.find_element(By.ID, "id_label").send_keys("rack 7")
    click_and_wait(console, console.find_element(By.NAME, "_save"))

    (message,) = [m for m in shown_messages(console) if "Registration token" in m]
    assert message.startswith("Registration token for Ada's GPUs: gpreg_")
    assert "will not be shown again" in message
    raw = re.search(r"gpreg_[\w-]+", message).group()  # type: ignore[union-attr]
    token = RegistrationToken.objects.get(label="rack 7")
    assert token.provider == provider
    assert token.token_digest == secret_digest(raw)
    assert console.page_source.count(raw) == 1
    # The list shows the token's prefix only.
    assert f"{token.prefix}…" in listed(console, "token_prefix")

    console.refresh()
    wait_for_page(console)

    assert raw not in console.page_source
    assert not [m for m in shown_messages(console) if "Registration token" in m]
    open_page(console, live_server, reverse("admin:providers_registrationtoken_change", args=[token.pk]))
    assert raw not in console.page_source


def test_job_page_shows_its_audit_trail_and_no_way_to_edit_its_status(console, live_server) -> None:  # type: ignore[no-untyped-def]
    job = JobFactory(name="render-frames")
    placed_lease(job=job, machine=machine_with("rig-render", gpus=1), started=True)
    job.refresh_from_db()
    recorded = list(Event.objects.filter(job=job).order_by("created_at", "id").values_list("kind", flat=True))
    assert job.status == Job.Status.RUNNING and len(recorded) >= 2

    open_page(console, live_server, reverse("admin:jobs_job_changelist"))
    click_and_wait(console, console.find_element(By.LINK_TEXT, "render-frames"))

    events = console.find_element(By.ID, "events-group")
    assert [td.text for td in events.find_elements(By.CSS_SELECTOR, "tbody td.field-kind")] == recorded
    assert console.find_element(By.CSS_SELECTOR, ".form-row.field-status .readonly").text == "Running"
    editable = "input:not([type=hidden]), select, textarea"
    assert not console.find_elements(By.CSS_SELECTOR, f".field-status :is({editable})")
    assert not console.find_elements(By.CSS_SELECTOR, "[name=status], [name$='-status']")
