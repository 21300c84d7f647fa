"""The board in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): sign in, filter to P0, open an
incident the intake created, resolve it with a note, see the timeline."""

import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import PERSONAL_TOKENS, TEST_TOKEN, api_users
from tests.factories import raw_alert, webhook
from loopback.processes import FunctionProcess

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian chromium and chromium-driver (make test installs them)")


@pytest.fixture(scope="module")
def browser():
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # A profile of its own, removed afterwards: nothing shared with another
    # run or a person's browser, nothing left behind.
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--disable-gpu",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(20)
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def stack(base_env):
    query = FunctionProcess("query", dict(base_env)).start()
    intake = FunctionProcess("intake", dict(base_env)).start()
    yield query, intake
    query.stop()
    intake.stop()


def screenshot(browser, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_sign_in_filter_open_resolve_and_see_the_timeline(browser, stack, clean_db):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import Select, WebDriverWait

    query, intake = stack
    auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
    page_me = raw_alert("EmailServiceDown", severity="critical", service="email", team="<script>alert('x')</script>")
    page_me["annotations"] = {"summary": "Service completely down"}
    tell_me = raw_alert("KafkaConsumerLagHigh", severity="warning", service="email")
    created = requests.post(intake.url + "/webhook/alert", json=webhook([page_me, tell_me]), headers=auth, timeout=10).json()
    p0_id = created["results"][0]["incident_id"]

    # A click that submits a form replaces the page while the wait reads it:
    # Chromium may then answer "node does not belong to the document", which
    # only means "not yet"; a page that never comes still times out.
    wait = WebDriverWait(browser, 10, ignored_exceptions=(WebDriverException,))
    browser.get(query.url + "/ui")
    wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(TEST_TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(ec.presence_of_element_located((By.ID, "filters")))
    assert "token" not in browser.current_url and TEST_TOKEN not in browser.current_url

    Select(browser.find_element(By.ID, "filter-priority")).select_by_value("P0")
    browser.find_element(By.ID, "apply-filters").click()
    wait.until(lambda d: "priority=P0" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "table.incidents tbody tr")
    assert [r.find_element(By.TAG_NAME, "a").text for r in rows] == ["EmailServiceDown"]
    screenshot(browser, "board.png")

    browser.find_element(By.LINK_TEXT, "EmailServiceDown").click()
    wait.until(ec.presence_of_element_located((By.ID, "transition-form")))
    assert f"/ui/incidents/{p0_id}" in browser.current_url
    assert "<script>alert('x')</script>" in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.ID, "note").send_keys("rolled back the release")
    browser.find_element(By.ID, "to-resolved").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "timeline"), "rolled back the release"))
    assert "resolved" in browser.find_element(By.CSS_SELECTOR, "h1 .status").text
    assert sorted(b.get_attribute("id") for b in browser.find_elements(By.CSS_SELECTOR, "#transition-form button")) == ["acknowledge", "to-closed"]
    screenshot(browser, "incident.png")
    logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
    assert not [entry for entry in logs if "Content Security Policy" in entry.get("message", "")]


@pytest.fixture(scope="module")
def approving(base_env, kube, database_url):
    """Remediation in approve mode, and a query function whose outbox
    publishes to it (the Broker's trigger in the cluster)."""
    from tests.test_remediation import _env

    remediation = FunctionProcess("remediation", _env(base_env, kube, database_url, REMEDIATION_MODE="approve")).start()
    query = FunctionProcess("query", {**base_env, "K_SINK": remediation.url, "REMEDIATION_APPROVERS": "alice",
                                      "INCIDENT_API_USERS": api_users("alice")}).start()
    yield query, remediation
    query.stop()
    remediation.stop()


def test_approve_a_proposal_on_the_incident_page(browser, approving, kube, clean_db):
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from loopback.kube import deployment
    from loopback.processes import wait_until
    from shared import proposals
    from tests.test_remediation import deliver, incident, reply_of

    query, remediation = approving
    kube.deployments.clear(), kube.requests.clear(), kube.failures.clear()
    kube.add_deployment(deployment("email-service", 1))
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    proposal = reply_of(deliver(remediation, row)).data["remediation"]["proposal"]

    # A click that submits a form replaces the page while the wait reads it:
    # Chromium may then answer "node does not belong to the document", which
    # only means "not yet"; a page that never comes still times out.
    wait = WebDriverWait(browser, 10, ignored_exceptions=(WebDriverException,))
    browser.delete_all_cookies()
    browser.get(query.url + "/ui/login")
    # Alice signs in with her own token: an approver must be verified.
    wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(PERSONAL_TOKENS["alice"])
    browser.find_element(By.ID, "sign-in").click()
    wait.until(ec.presence_of_element_located((By.ID, "filters")))
    assert browser.find_element(By.ID, "signed-in-as").text == "Signed in as alice"
    # The link the Slack message and the page carry.
    browser.get(proposal["url"].replace("http://localhost:8080", query.url))
    wait.until(ec.presence_of_element_located((By.ID, f"proposal-{proposal['id']}")))
    card = browser.find_element(By.ID, f"proposal-{proposal['id']}").text
    assert "scale_deployment" in card and "production/email-service" in card and "1 → 6" in card
    screenshot(browser, "proposal.png")
    assert browser.find_element(By.ID, f"decider-{proposal['id']}").text.startswith("Deciding as alice")
    assert not browser.find_elements(By.ID, f"actor-{proposal['id']}")
    browser.find_element(By.ID, f"approve-{proposal['id']}").click()
    wait.until(ec.presence_of_element_located((By.ID, "proposal-notice")))
    assert "approved" in browser.find_element(By.ID, "proposal-notice").text

    def status():
        with clean_db.connect() as conn:
            return proposals.get(conn, row["id"], proposal["id"])["status"]

    wait_until(lambda: status() == "executed", 30, message="the approved proposal executed")
    assert [p.json() for p in kube.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}]
    browser.refresh()
    wait.until(ec.text_to_be_present_in_element((By.ID, f"proposal-status-{proposal['id']}"), "executed"))
    assert "approved by user:alice" not in card  # decided after the first render
    assert "user:alice" in browser.find_element(By.ID, f"proposal-{proposal['id']}").text
    assert not browser.find_elements(By.ID, f"approve-{proposal['id']}")
