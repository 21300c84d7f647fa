"""The incident board rendered through the query function's Flask app."""

import json
import re
from datetime import datetime
from pathlib import Path

import functions_framework
import pytest
import sqlalchemy as sa

from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(_settings_env):
    return functions_framework.create_app("query", str(ROOT / "functions" / "query" / "main.py"))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def signed_in(client):
    response = client.post("/ui/login", data={"token": TEST_TOKEN, "next": "/ui"})
    assert response.status_code == 303
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def seed(engine, name, priority="P0", to=(), **labels):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, priority=priority, **labels)], "/t", "t").outcomes[0].incident_id
        for status in to:
            svc.transition(conn, incident_id, status, "t", "/t", note=f"to {status}")
    return incident_id


def test_pages_need_a_session(client, clean_db):
    response = client.get("/ui?priority=P0")
    assert response.status_code == 303 and response.headers["Location"] == "/ui/login?next=%2Fui%3Fpriority%3DP0"
    assert client.get("/ui/incidents/00000000-0000-4000-8000-000000000000").status_code == 303
    assert client.get("/").headers["Location"] == "/ui"


def test_sign_in_sets_a_hardened_cookie_and_never_the_token(client):
    bad = client.post("/ui/login", data={"token": "wrong", "next": "/ui"})
    assert bad.status_code == 401 and "not valid" in bad.get_data(as_text=True)
    good = client.post("/ui/login", data={"token": TEST_TOKEN, "next": "/ui?status=open"})
    cookie = good.headers["Set-Cookie"]
    assert good.headers["Location"] == "/ui?status=open"
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert TEST_TOKEN not in cookie


def test_next_never_leaves_the_board(client):
    response = client.post("/ui/login", data={"token": TEST_TOKEN, "next": "//evil.example/ui"})
    assert response.headers["Location"] == "/ui"


def test_list_shows_every_status_and_priority_with_counts(signed_in, clean_db):
    paths = {"open": (), "investigating": ("investigating",), "resolved": ("resolved",), "closed": ("resolved", "closed")}
    for priority in ("P0", "P1", "P2"):
        for status, path in paths.items():
            seed(clean_db, f"{status.title()}{priority}", priority=priority, to=path, service="email")
    response = signed_in.get("/ui")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    for priority in ("P0", "P1", "P2"):
        assert f'class="priority priority-{priority.lower()}" title="Priority {priority}">{priority}<' in html
        for status in paths:
            assert f"{status.title()}{priority}" in html
    assert re.search(r'status-open">open</span> <strong>3</strong>', html)
    assert re.search(r'priority-p0" title="Priority P0">P0</span> <strong>4</strong>', html)
    assert 'http-equiv="refresh"' in html


def test_filters_apply_and_empty_fields_mean_any(signed_in, clean_db):
    seed(clean_db, "PageMe", priority="P0", service="email")
    seed(clean_db, "TellMe", priority="P1", service="billing")
    html = signed_in.get("/ui?status=&priority=P0&since=&service=&alert_name=").get_data(as_text=True)
    assert "PageMe" in html and "TellMe" not in html
    html = signed_in.get("/ui?service=billing").get_data(as_text=True)
    assert "TellMe" in html and "PageMe" not in html
    bad = signed_in.get("/ui?since=yesterday").get_data(as_text=True)
    assert "since" in bad and 'role="alert"' in bad


def test_list_pages_with_a_cursor(signed_in, clean_db):
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [alert("Many", instance=str(i)) for i in range(60)], "/t", "t")
    html = signed_in.get("/ui?limit=50").get_data(as_text=True)
    assert html.count('href="/ui/incidents/') == 50
    next_url = re.search(r'href="([^"]+)" rel="next"', html).group(1).replace("&amp;", "&")
    assert signed_in.get(next_url).get_data(as_text=True).count('href="/ui/incidents/') == 10


@pytest.mark.parametrize("path, buttons", [
    ((), ["acknowledge", "to-resolved"]),
    (("investigating",), ["to-resolved"]),  # a person took it: acknowledged
    (("resolved",), ["acknowledge", "to-closed"]),  # reopen and acknowledge
    (("resolved", "closed"), []),
])
def test_incident_page_offers_only_the_allowed_transitions(signed_in, clean_db, path, buttons):
    incident_id = seed(clean_db, "Detail", to=path, service="email", namespace="production")
    with clean_db.begin() as conn:
        svc.store_diagnostics(conn, incident_id, {"pods": {"email-service": {"ready": "1/3", "status": "CrashLoopBackOff", "restarts": 7,
                                                                              "waiting_reasons": ["CrashLoopBackOff"], "last_terminated_reasons": ["OOMKilled"]}},
                                                  "metrics": {"availability": 0.999, "latency_p95": {"error": "timed out"}},
                                                  "dependencies": {"kafka": "up", "postgres": "down"}, "collected_at": "2026-11-27T10:00:00Z"})
        svc.append_remediation_action(conn, incident_id, {"action": "scale_deployment", "target": "email-service", "from": 1, "to": 6,
                                                          "timestamp": "2026-11-27T10:01:00Z", "success": True, "dry_run": True, "error": None})
        svc.add_timeline(conn, incident_id, "notification", {"channel": "pagerduty", "action": "trigger", "transition": "opened", "outcome": "sent"})
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert sorted(re.findall(r'id="(to-[a-z]+|acknowledge)"', html)) == sorted(buttons)
    assert "1/3" in html and "CrashLoopBackOff" in html and "OOMKilled" in html
    assert "0.999" in html and "timed out" in html and 'dep-down">postgres: down' in html
    assert "scale_deployment" in html and "1 → 6" in html and "dry-run" in html
    assert "pagerduty trigger on opened: sent" in html


def test_an_incident_flapping_reopened_silently_after_an_acknowledgement_can_be_taken_to_investigating(signed_in, clean_db):
    """alice took it and it resolved; the alert flapped and the incident went
    back to open silently (the same generation: her acknowledgement stands,
    so no Acknowledge button). Moving it to investigating is still offered."""
    from shared import flapping

    incident_id = seed(clean_db, "FlappedBack", to=("investigating", "resolved"))
    with clean_db.begin() as conn:
        assert conn.execute(flapping._SILENT_REOPEN, {"id": incident_id, "now": datetime.utcnow()}).first()
        svc.add_timeline(conn, incident_id, "notification", {
            "channel": "pagerduty", "action": "resolve", "transition": "resolved", "outcome": "skipped",
            "reason": "PagerDuty is off in the replica that handled it; left to one where it is on"}, "escalation")
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert 'id="acknowledged-by">Acknowledged by t<' in html
    assert sorted(re.findall(r'id="(to-[a-z]+|acknowledge)"', html)) == ["to-investigating", "to-resolved"]
    assert html.count("PagerDuty is off in the replica that handled it; left to one where it is on") == 2  # escalations and timeline
    response = signed_in.post(f"/ui/incidents/{incident_id}/status", data={"status": "investigating", "csrf": csrf_of(html)})
    assert response.status_code == 303
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, incident_id)["status"] == "investigating"


def test_incident_page_keeps_every_generations_actions_and_marks_the_current_ones(signed_in, clean_db):
    incident_id = seed(clean_db, "Reopened")
    scaled = {"action": "scale_deployment", "target": "email-service", "from": 1, "to": 3, "timestamp": "2026-11-27T10:01:00Z",
              "success": True, "dry_run": False, "error": None}
    with clean_db.begin() as conn:
        # Written by the release before stamping: read as generation 0.
        conn.execute(sa.text("UPDATE incidents SET remediation_actions = CAST(:a AS json), generation = 1 WHERE id = :id"),
                     {"a": json.dumps([scaled]), "id": incident_id})
        svc.append_remediation_action(conn, incident_id, {**scaled, "action": "restart_pods", "success": False, "error": "forbidden"})
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    rows = re.findall(r"<tr(?: class=\"muted\")?><td>(\d+) (current|earlier)</td>\s*<td>(\w+)", html)
    assert rows == [("0", "earlier", "scale_deployment"), ("1", "current", "restart_pods")]
    assert '<tr class="muted"><td>0 earlier' in html
    report = signed_in.get(f"/ui/incidents/{incident_id}/report.md").get_data(as_text=True)
    assert "succeeded at 2026\\-11\\-27T10:01:00Z, generation 0\n" in report
    assert "failed: forbidden at 2026\\-11\\-27T10:01:00Z, generation 1\n" in report


def test_transition_needs_the_csrf_token(signed_in, clean_db):
    incident_id = seed(clean_db, "Csrf")
    assert signed_in.post(f"/ui/incidents/{incident_id}/status", data={"status": "resolved"}).status_code == 403
    assert signed_in.post(f"/ui/incidents/{incident_id}/status", data={"status": "resolved", "csrf": "forged"}).status_code == 403
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, incident_id)["status"] == "open"


def test_resolving_with_a_note_goes_on_the_timeline(signed_in, clean_db):
    incident_id = seed(clean_db, "ResolveMe")
    page = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    response = signed_in.post(f"/ui/incidents/{incident_id}/status",
                              data={"status": "resolved", "note": "rolled back 1.4.2", "csrf": csrf_of(page)})
    assert response.status_code == 303
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert "rolled back 1.4.2" in html and "by board" in html
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, incident_id)["status"] == "resolved"
        assert conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE type LIKE '%resolved'")).scalar() == 1


def acknowledged_events(engine, incident_id):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM event_outbox WHERE subject = :i AND type LIKE '%acknowledged' ORDER BY id"),
                            {"i": incident_id}).scalars().all()


def test_an_incident_diagnostics_moved_to_investigating_is_acknowledged_from_the_board(signed_in, clean_db):
    """Diagnostics moved it to investigating, which is no acknowledgement:
    the board still offers Acknowledge, which takes it as POST
    /incidents/{id}/acknowledge does (the event that acknowledges the page),
    and then names who instead."""
    from shared import lifecycle

    incident_id = seed(clean_db, "DiagnosedFirst")
    with clean_db.begin() as conn:
        lifecycle.mark_investigating(conn, incident_id, "diagnostics")
    page = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert re.search(r'id="acknowledge">Acknowledge<', page)
    response = signed_in.post(f"/ui/incidents/{incident_id}/acknowledge", data={"csrf": csrf_of(page), "note": "on it", "actor": "alice"})
    assert response.status_code == 303
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert 'id="acknowledge"' not in html and "Acknowledged by board:alice" in html and "on it" in html
    assert acknowledged_events(clean_db, incident_id) == [f"{incident_id}.acknowledged.0"]
    # Once is enough: nothing is sent again.
    assert signed_in.post(f"/ui/incidents/{incident_id}/acknowledge", data={"csrf": csrf_of(page)}).status_code == 303
    assert acknowledged_events(clean_db, incident_id) == [f"{incident_id}.acknowledged.0"]


def test_reopen_and_acknowledge_on_a_resolved_incident_does_both(signed_in, clean_db):
    incident_id = seed(clean_db, "ReopenMe", to=("investigating", "resolved"))
    page = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert re.search(r'id="acknowledge">Reopen and acknowledge<', page)
    assert signed_in.post(f"/ui/incidents/{incident_id}/acknowledge", data={"csrf": csrf_of(page), "actor": "bob"}).status_code == 303
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, incident_id)
    assert (row["status"], row["generation"]) == ("investigating", 1)
    assert acknowledged_events(clean_db, incident_id) == [f"{incident_id}.acknowledged.0", f"{incident_id}.acknowledged.1"]
    assert "Acknowledged by board:bob" in signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)


def test_acknowledge_needs_the_csrf_token(signed_in, clean_db):
    incident_id = seed(clean_db, "AckCsrf")
    assert signed_in.post(f"/ui/incidents/{incident_id}/acknowledge", data={"csrf": "forged"}).status_code == 403
    assert acknowledged_events(clean_db, incident_id) == []


def test_an_invalid_transition_shows_the_reason(signed_in, clean_db):
    incident_id = seed(clean_db, "Closed", to=("resolved", "closed"))
    page = signed_in.get("/ui").get_data(as_text=True)
    response = signed_in.post(f"/ui/incidents/{incident_id}/status", data={"status": "investigating", "csrf": csrf_of(page)})
    html = signed_in.get(response.headers["Location"]).get_data(as_text=True)
    assert "cannot move an incident from closed to investigating" in html


def test_alert_html_is_rendered_as_text(signed_in, clean_db):
    incident_id = seed(clean_db, "Xss", team="<script>alert(1)</script>", service="<b>svc</b>")
    html = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>svc</b>" not in signed_in.get("/ui").get_data(as_text=True)


def test_post_incident_report_draft(signed_in, clean_db):
    incident_id = seed(clean_db, "EmailServiceDown", to=("investigating", "resolved"), service="email")
    response = signed_in.get(f"/ui/incidents/{incident_id}/report.md")
    text = response.get_data(as_text=True)
    assert response.mimetype == "text/markdown"
    assert text.startswith("# Post-incident report: EmailServiceDown (P0)")
    assert "| opened |" in text and "to resolved" in text and "Time to resolve:" in text


def test_unknown_and_malformed_incidents(signed_in, clean_db):
    assert signed_in.get("/ui/incidents/00000000-0000-4000-8000-000000000000").status_code == 404
    assert signed_in.get("/ui/incidents/nope").status_code == 400


def test_sign_out_needs_csrf_and_ends_the_session(signed_in, clean_db):
    page = signed_in.get("/ui").get_data(as_text=True)
    response = signed_in.post("/ui/logout", data={"csrf": csrf_of(page)})
    assert response.headers["Location"] == "/ui/login"
    assert signed_in.get("/ui").status_code == 303


def test_a_cookie_captured_before_sign_out_is_refused_after_it(app, signed_in, clean_db):
    captured = signed_in.get_cookie("ir_session", path="/ui").value
    incident_id = seed(clean_db, "Captured")
    page = signed_in.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    csrf = csrf_of(page)
    assert signed_in.post("/ui/logout", data={"csrf": csrf}).headers["Location"] == "/ui/login"

    replay = app.test_client()
    replay.set_cookie("ir_session", captured, path="/ui")
    assert replay.get("/ui").status_code == 303
    assert replay.get(f"/ui/incidents/{incident_id}").status_code == 303
    assert replay.get(f"/ui/incidents/{incident_id}/report.md").status_code == 303
    moved = replay.post(f"/ui/incidents/{incident_id}/status", data={"csrf": csrf, "status": "investigating"})
    assert moved.headers["Location"] == "/ui/login"
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM incidents WHERE id = :id"), {"id": incident_id}).scalar() == "open"
        (expires_at,) = conn.execute(sa.text("SELECT expires_at - timezone('utc', now()) FROM revoked_sessions")).one()
    assert 11.9 * 3600 < expires_at.total_seconds() <= 12 * 3600


def test_other_sessions_live_on_and_expired_revocations_are_purged(app, clean_db):
    first, second = app.test_client(), app.test_client()
    for client in (first, second):
        assert client.post("/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}).status_code == 303
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO revoked_sessions (session_id, expires_at) VALUES ('old', timezone('utc', now()) - interval '1 minute')"))
    first.post("/ui/logout", data={"csrf": csrf_of(first.get("/ui").get_data(as_text=True))})
    assert first.get("/ui").status_code == 303
    assert second.get("/ui").status_code == 200
    with clean_db.connect() as conn:
        ids = conn.execute(sa.text("SELECT session_id FROM revoked_sessions")).scalars().all()
    assert len(ids) == 1 and ids[0] != "old"


# --------------------------------------------------------------------------- the Markdown report is inert

HOSTILE = {
    "name": "Evil<script>alert(1)</script>*_`x`_*",
    "summary": "[login](javascript:alert(1)) <img src=x onerror=alert(1)> **bold** <https://evil.example> &amp; ![i](javascript:x)",
    "service": "a | b | c\n# Injected heading",
    "description": (
        "line one\n# Heading\n- item\n+ item\n1. one\n```\nfence\n```\n~~~\n    indented code\n\t\ttabbed\n"
        "| a | b |\n|---|---|\n<div onclick=x>html</div>\n&lt;entity&gt; &#x3C;script&#x3E;\n> quote\n---\nsetext\n===\n"
        "[ref]: javascript:alert(1)\n[ref]\ntrailing backslash \\\nend  \nx\u2028# after a line separator\r\n\r\n<!-- comment -->"
    ),
    "note": "note | with pipe\r\n## and <b>bold</b> and `code` and [x](javascript:y)",
    "actor": "<script>who</script>|`",
    "pod": "``evil`` <x>`",
    "metric": "<script>m</script>",
    "value": "[x](javascript:y) | *",
    "action": "scale`x`",
    "target": "<b>t</b>\n# t",
    "error": "**e** <i>",
}


def benign_twin(value: str) -> str:
    """The same shape (lines and blanks) with nothing Markdown could read."""
    return re.sub(r"\S", "a", value)


def report_with(client, engine, values: dict) -> str:
    from dataclasses import replace

    base = alert(values["name"][:100], priority="P0", service=values["service"])
    hostile = replace(base, summary=values["summary"], description=values["description"])
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [hostile], "/t", "t").outcomes[0].incident_id
        svc.transition(conn, incident_id, "investigating", values["actor"], "/t", note=values["note"])
        svc.store_diagnostics(conn, incident_id, {"pods": {values["pod"]: {"ready": values["value"], "status": values["metric"], "restarts": 1}},
                                                  "metrics": {values["metric"]: values["value"]},
                                                  "dependencies": {values["metric"]: values["value"]}})
        svc.append_remediation_action(conn, incident_id, {"action": values["action"], "target": values["target"], "from": values["value"],
                                                          "to": values["value"], "success": False, "error": values["error"],
                                                          "dry_run": True, "timestamp": "2026-11-27T10:00:00Z"})
    response = client.get(f"/ui/incidents/{incident_id}/report.md")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def structure(markdown: str) -> list:
    """Block and inline token types as a GFM-like renderer (raw HTML on) sees them."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    return [(t.type, t.tag, [c.type for c in t.children or []]) for t in renderer.parse(markdown)]


def test_the_markdown_report_renders_hostile_values_as_plain_text(signed_in, clean_db):
    from markdown_it import MarkdownIt

    hostile = report_with(signed_in, clean_db, HOSTILE)
    benign = report_with(signed_in, clean_db, {k: benign_twin(v) for k, v in HOSTILE.items()})
    # Hostile values make exactly the document benign values of the same shape make.
    assert structure(hostile) == structure(benign)
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(hostile)
    for tag in ("<script", "<img", "<a ", "<b>", "<i>", "<div", "<blockquote", "<pre", "<hr", "<h3", "<!--", "<strong>bold"):
        assert tag not in html, tag
    assert html.count("<h1>") == 1 and html.count("<table>") == 1 and html.count("<h2>") == 7
    # The text itself survives, character for character.
    assert "Evil&lt;script&gt;alert(1)&lt;/script&gt;*_<code>x</code>_*" not in html
    assert "Evil&lt;script&gt;alert(1)&lt;/script&gt;*_`x`_*" in html
    assert "[login](javascript:alert(1)) &lt;img src=x onerror=alert(1)&gt; **bold** &lt;https://evil.example&gt; &amp;amp;" in html
    assert "note | with pipe ## and &lt;b&gt;bold&lt;/b&gt; and `code` and [x](javascript:y)" in html
    assert "<code>``evil`` &lt;x&gt;`</code>" in html and "<code>scale`x`</code>" in html


def test_markdown_escaping_keeps_inline_values_on_one_line():
    from functions.query.board import md, md_block, md_code

    assert md("a\r\nb\nc\u2028d\x00e") == "a b c d\ufffde"
    assert md("<x> & [y](z) | # - + . ! _ * ` ~ = $ \\") == "\\<x\\> \\& \\[y\\]\\(z\\) \\| \\# \\- \\+ \\. \\! \\_ \\* \\` \\~ \\= \\$ \\\\"
    assert md("user@example.com, 50% /path;q?:'\"") == "user@example\\.com, 50% /path;q?:'\""
    assert md_block("  # a\n\n    b") == "\\# a\n\nb"
    assert md_code("a``b") == "```a``b```" and md_code("`x") == "`` `x ``" and md_code(None) == "``"


def test_the_filter_form_shows_the_declared_filters(signed_in, clean_db):
    from shared.filters import BOARD_FILTERS, Kind

    html = signed_in.get("/ui?status=investigating&service=email").get_data(as_text=True)
    form = html[html.index('<form class="filters"'):html.index("</form>", html.index('<form class="filters"'))]
    assert re.findall(r'<(?:select|input) name="([^"]+)"', form) == [f.name for f in BOARD_FILTERS]
    for f in BOARD_FILTERS:
        assert f">{f.widget.label} " in form or f">{f.widget.label}\n" in form, f.name
        if f.kind is Kind.ENUM:
            select = form[form.index(f'id="filter-{f.name}"'):]
            select = select[:select.index("</select>")]
            assert re.findall(r'<option value="([^"]*)"', select) == ["", *f.allowed]
    assert '<option value="investigating" selected>' in form
    assert 'name="service" id="filter-service" value="email"' in form


def test_a_filter_the_board_refused_is_not_carried_by_the_next_page_link(signed_in, clean_db):
    # The page lists what it could (the first page, unfiltered) and says
    # why; its "Older" link carried the refused filter with the cursor, was
    # refused the same way, and showed the first page again, forever.
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [alert("Many", instance=str(i)) for i in range(60)], "/t", "t")
    html = signed_in.get("/ui?priority=P9").get_data(as_text=True)
    assert html.count('href="/ui/incidents/') == 50 and "P9" in html
    next_url = re.search(r'href="([^"]+)" rel="next"', html).group(1).replace("&amp;", "&")
    assert "priority" not in next_url
    assert signed_in.get(next_url).get_data(as_text=True).count('href="/ui/incidents/') == 10


def test_the_refresh_and_next_links_repeat_the_query_as_typed(signed_in, clean_db):
    # A query sent unencoded (a link pasted from a terminal) keeps its
    # characters in the page's own links: shown as ‹U+202E› there, the
    # refresh 30 s later filtered for another name.
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [alert("Disk\u202eFull", instance=str(i)) for i in range(3)], "/t", "t")
    html = signed_in.get("/ui", environ_overrides={"QUERY_STRING": "alert_name=Disk\u202eFull&limit=2".encode().decode("latin-1")}
                         ).get_data(as_text=True)
    assert html.count('href="/ui/incidents/') == 2
    assert 'content="30; url=/ui?alert_name=Disk\u202eFull&amp;limit=2"' in html
    next_url = re.search(r'href="([^"]+)" rel="next"', html).group(1).replace("&amp;", "&")
    assert "‹" not in next_url
    assert signed_in.get(next_url).get_data(as_text=True).count('href="/ui/incidents/') == 1
