"""Probable causes where people read them: the board's incident page and the
Markdown report (evidence linked to the facts), Slack and PagerDuty (bounded),
and the query API. The diagnosis shown is collected from a labelled case
through the loopback Kubernetes API, not written by hand."""

from __future__ import annotations

import re

import pytest
import requests
import yaml

from functions.diagnostics.causes import VOCABULARY
from functions.diagnostics.collector import Collector, load_probes
from shared import diagnosis, events
from shared import incidents as svc
from shared import kube as kube_client
from tests.conftest import TEST_TOKEN
from tests.diagnosis_cases import PROBES, load_cases, load_into
from tests.test_board import app, client, signed_in  # noqa: F401 - fixtures
from tests.test_escalation import deliver, escalation, open_incident, receivers  # noqa: F401 - fixtures

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def collected(kube, settings_obj):
    """The diagnosis of the rollout-crash case (no Prometheus: metrics not configured)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", str(kube.kubeconfig_path))
        kube_client.reset()
        (case,) = [c for c in load_cases() if c.name == "rollout-crash"]
        load_into(kube, case)
        d = Collector(settings_obj, load_probes(str(PROBES))).collect(case.incident())
        kube_client.reset()
    assert d["probable_causes"][0]["cause"] == "bad_rollout"
    return d


def store(engine, row, d):
    with engine.begin() as conn:
        svc.store_diagnostics(conn, row["id"], d)
        return svc.get_incident(conn, row["id"])


def test_the_incident_page_links_every_piece_of_evidence_to_its_fact(signed_in, clean_db, collected):  # noqa: F811
    row = store(clean_db, open_incident(clean_db), collected)
    html = signed_in.get(f"/ui/incidents/{row['id']}").get_data(as_text=True)
    causes = html[html.index('id="probable-causes"'):html.index("</ol>", html.index('id="probable-causes"'))]
    assert "<strong>bad_rollout</strong>" in causes and "(97 %)" in causes
    links = re.findall(r'<a href="#([^"]+)">', causes)
    assert links and set(links) == {diagnosis.anchor(e) for c in collected["probable_causes"] for e in c["evidence"]}
    anchors = set(re.findall(r'<tr id="([^"]+)">', html))
    assert set(links) <= anchors
    # The log lines are on the page, under their fact.
    assert "FATAL exiting" in html and 'id="fact-log-cart-new-a-app-previous"' in html


def test_the_report_lists_the_causes_and_the_facts_they_cite(signed_in, clean_db, collected):  # noqa: F811
    from markdown_it import MarkdownIt

    row = store(clean_db, open_incident(clean_db), collected)
    text = signed_in.get(f"/ui/incidents/{row['id']}/report.md").get_data(as_text=True)
    assert "1. `bad_rollout` (97 %): Revision 7 rolled out" in text
    html = MarkdownIt("commonmark").render(text)
    hrefs = set(re.findall(r'<a href="#([^"]+)">', html))
    ids = set(re.findall(r'<a id="([^"]+)"></a>', html))
    assert hrefs and hrefs <= ids
    assert "revision 7 created 2026-11-27T09:41:00Z (current)" in html


def test_slack_and_pagerduty_carry_the_first_causes_bounded(escalation, receivers, clean_db, collected):  # noqa: F811
    pd, hook = receivers
    d = {**collected, "probable_causes": collected["probable_causes"] + [
        {"cause": "unknown", "confidence": 0.0, "summary": "x" * 5000, "evidence": [f"pod/{i}" for i in range(40)]}] * 3}
    row = store(clean_db, open_incident(clean_db), d)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    (trigger,) = pd.bodies()
    brief = trigger["payload"]["custom_details"]["probable_causes"]
    assert [c["cause"] for c in brief] == [c["cause"] for c in d["probable_causes"][:3]]
    assert brief[0]["evidence"] == collected["probable_causes"][0]["evidence"][:5]
    assert all(len(c["summary"]) <= 300 and len(c["evidence"]) <= 5 for c in brief)
    (message,) = hook.bodies()
    texts = [b["text"]["text"] for b in message["blocks"] if b.get("type") == "section" and "text" in b]
    (section,) = [t for t in texts if t.startswith("*Probable cause*")]
    assert "1. *bad_rollout* (97%) Revision 7 rolled out" in section and "2. *crash_loop*" in section


def test_the_query_api_returns_the_causes(base_env, clean_db, collected):
    from loopback.processes import FunctionProcess

    row = store(clean_db, open_incident(clean_db), collected)
    proc = FunctionProcess("query", base_env).start()
    try:
        body = requests.get(f"{proc.url}/incidents/{row['id']}", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10).json()
    finally:
        proc.stop()
    assert body["diagnostics"]["probable_causes"] == collected["probable_causes"]


def test_the_api_schema_names_the_vocabulary():
    spec = yaml.safe_load((ROOT / "functions" / "query" / "openapi.yaml").read_text())
    assert spec["components"]["schemas"]["ProbableCause"]["properties"]["cause"]["enum"] == list(VOCABULARY)


def test_a_diagnosis_stored_before_facts_had_ids_still_renders(signed_in, clean_db):  # noqa: F811
    legacy = {"pods": {"email-service": {"ready": "1/3", "status": "CrashLoopBackOff", "restarts": 4,
                                         "pods": [{"name": "email-service-0", "phase": "Running", "ready": False}]}},
              "metrics": {"availability": 0.9}, "dependencies": {"kafka": "up"}, "collected_at": "2026-11-27T10:00:00Z",
              "probable_causes": "garbage", "events": [{"reason": "no id"}], "changes": {"diff": {"from": 1}}}
    assert list(diagnosis.facts(legacy)) == [("metric/availability", "metrics", "availability = 0.9"),
                                             ("dependency/kafka", "dependencies", "kafka = up")]
    row = store(clean_db, open_incident(clean_db), legacy)
    page = signed_in.get(f"/ui/incidents/{row['id']}")
    assert page.status_code == 200 and "Probable causes" not in page.get_data(as_text=True)
    assert signed_in.get(f"/ui/incidents/{row['id']}/report.md").status_code == 200
