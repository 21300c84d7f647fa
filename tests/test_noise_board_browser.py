"""Noise control on the board in a real headless Chromium: create a
maintenance window that holds an alert, end it, and silence an incident's
alert in the real AlertManager, then expire the silence."""

from __future__ import annotations

import pytest
import requests

from tests.alertmanager import AlertManager
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from tests.test_board_browser import CHROMEDRIVER, CHROMIUM, browser, screenshot  # noqa: F401 - browser is a fixture
from loopback.processes import FunctionProcess, wait_until

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian chromium and chromium-driver (make test installs them)")
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def stack(base_env):
    am = AlertManager("http://127.0.0.1:9/unused", TEST_TOKEN).start()
    query = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": am.url}).start()
    intake = FunctionProcess("intake", dict(base_env)).start()
    yield query, intake, am
    query.stop(), intake.stop(), am.stop()


def sign_in(driver, query, wait):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(query.url + "/ui/maintenance")
    wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(TEST_TOKEN)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(ec.presence_of_element_located((By.ID, "window-form")))


def test_create_a_window_that_holds_an_alert_and_silence_another_in_alertmanager(browser, stack, clean_db):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import Select, WebDriverWait

    query, intake, am = stack
    # A click that submits a form replaces the page while the wait reads it:
    # Chromium may then answer "node does not belong to the document", which
    # only means "not yet"; a page that never comes still times out.
    wait = WebDriverWait(browser, 10, ignored_exceptions=(WebDriverException,))
    sign_in(browser, query, wait)

    browser.find_element(By.ID, "window-matchers").send_keys('namespace="db"\nalertname=~"Postgres.*"')
    browser.find_element(By.ID, "window-duration").clear()
    browser.find_element(By.ID, "window-duration").send_keys("90")
    browser.find_element(By.ID, "window-reason").send_keys("node pool upgrade")
    browser.find_element(By.ID, "window-actor").send_keys("alice")
    browser.find_element(By.ID, "window-create").click()
    wait.until(ec.presence_of_element_located((By.ID, "notice")))
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#windows tbody tr")
    assert "active" in row.text and "node pool upgrade" in row.text and "board:alice" in row.text
    assert 'namespace="db"' in row.text and 'alertname=~"Postgres.*"' in row.text

    held = requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("PostgresDown", namespace="db")]),
                         headers=AUTH, timeout=10).json()
    assert held["counts"] == {"suppressed": 1}
    browser.refresh()
    (alert_row,) = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#suppressed tbody tr"))
    assert "PostgresDown" in alert_row.text and alert_row.find_element(By.CLASS_NAME, "held-count").text == "1"
    screenshot(browser, "maintenance.png")

    browser.find_element(By.CSS_SELECTOR, "#windows .end-window").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "notice"), "ended"))
    assert "ended" in browser.find_element(By.CSS_SELECTOR, "#windows tbody tr").text
    ping = {"ce-id": "ping-board", "ce-source": "/apis/v1/namespaces/default/pingsources/outbox-sweep",
            "ce-type": "dev.knative.sources.ping", "ce-specversion": "1.0", "Content-Type": "application/json", **AUTH}
    requests.post(intake.url + "/", data=b'{"task": "outbox-sweep"}', headers=ping, timeout=30).raise_for_status()
    released = requests.get(query.url + "/incidents", params={"alert_name": "PostgresDown"}, headers=AUTH, timeout=10).json()
    assert [i["status"] for i in released] == ["open"]

    # Silence an incident's alert from its page; the silence is AlertManager's own.
    created = requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("EmailServiceDown", service="email")]),
                            headers=AUTH, timeout=10).json()
    incident_id = created["results"][0]["incident_id"]
    browser.get(query.url + f"/ui/incidents/{incident_id}")
    wait.until(ec.presence_of_element_located((By.ID, "silence-form")))
    Select(browser.find_element(By.ID, "silence-duration")).select_by_value("120")
    browser.find_element(By.ID, "silence-comment").send_keys("fix rolling out")
    browser.find_element(By.ID, "silence-create").click()
    expiry = wait.until(ec.presence_of_element_located((By.CLASS_NAME, "silence-expiry")))
    silences = [s for s in requests.get(am.url + "/api/v2/silences", timeout=5).json() if s["status"]["state"] == "active"]
    assert len(silences) == 1 and silences[0]["createdBy"] == "board"
    assert {m["name"] for m in silences[0]["matchers"]} >= {"alertname", "service", "severity"}
    assert expiry.get_attribute("datetime")[:16] == silences[0]["endsAt"][:16]
    assert "silenced" in browser.find_element(By.ID, "timeline").text
    screenshot(browser, "silence.png")

    browser.find_element(By.CSS_SELECTOR, "#silences .expire-silence").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "silences"), "No silence mutes this alert"))
    wait_until(lambda: [s["status"]["state"] for s in requests.get(am.url + "/api/v2/silences", timeout=5).json()] == ["expired"],
               10, message="silence expired in AlertManager")
    assert "silence_expired" in browser.find_element(By.ID, "timeline").text
    logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
    assert not [entry for entry in logs if "Content Security Policy" in entry.get("message", "")]
