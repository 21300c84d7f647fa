"""Every channel's message within its receiver's limit whatever the alert
holds, the work of making it bounded by that limit, and what Slack and
the people paged are shown of control characters."""

from __future__ import annotations

import json

import pytest

from functions.escalation.channels import pagerduty, slack, teams, webhook
from functions.escalation.channels.base import Note
from functions.escalation.channels.text import fit, utf16_len
from loopback.notify import WEBHOOK_MAX_BYTES, webhook_problems
from shared.config import load_settings

CONFIG = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PUBLIC_URL": "http://x:8080",
                        "OUTGOING_WEBHOOK_URL": "http://127.0.0.1:9/hook", "OUTGOING_WEBHOOK_SECRET": "s" * 32})
EMOJI = "\U0001F600"  # 12 bytes of JSON escapes: \ud83d\ude00


def incident(**fields) -> dict:
    return {"id": "00000000-0000-4000-8000-000000000000", "alert_name": "DiskFull", "priority": "P0", "status": "open",
            "summary": "disk full", "description": "", "labels": {"service": "payments"}, "annotations": {},
            "diagnostics": None, "remediation_actions": None, "correlation": None, "generation": 1, **fields}


def emoji_incident() -> dict:
    """The hostile test's reproduction: a runbook URL of 2,048 characters
    (within LINK_MAX) and emoji everywhere else."""
    return incident(alert_name=EMOJI * 90, summary=EMOJI * 3000, labels={"service": EMOJI * 200},
                    annotations={"runbook_url": "https://rb.example/" + EMOJI * 2029},
                    remediation_actions=[{"action": EMOJI * 10, "target": EMOJI * 50, "error": EMOJI * 200}] * 10,
                    diagnostics={"pods": {EMOJI * 50 + str(i): {"ready": EMOJI * 20, "status": EMOJI * 20} for i in range(50)}},
                    correlation={"alert_count": 3, "firing": 3, "latest_reason": EMOJI * 500})


def test_a_teams_card_always_fits_its_budget_and_leaves_a_runbook_link_out_whole():
    message = teams.teams_message(CONFIG, emoji_incident(), "remediation_failed", EMOJI * 2000)
    # Measured as sent: requests posts json= ASCII-escaped.
    assert len(json.dumps(message).encode()) <= teams.TEAMS_MESSAGE_MAX_BYTES
    card = message["attachments"][0]["content"]
    assert [a["title"] for a in card["actions"]] == ["Open incident"]
    assert teams.RUNBOOK_LEFT_OUT in [b.get("text") for b in card["body"]]


def test_a_teams_card_keeps_a_runbook_link_that_fits():
    card = teams.teams_message(CONFIG, incident(annotations={"runbook_url": "https://rb.example/disk"}), "opened", None)
    content = card["attachments"][0]["content"]
    assert {"type": "Action.OpenUrl", "title": "Runbook", "url": "https://rb.example/disk"} in content["actions"]
    assert teams.RUNBOOK_LEFT_OUT not in json.dumps(content)


def webhook_body(alert: dict, reason: str | None = None) -> bytes:
    out = webhook.Webhook(CONFIG).message(Note("remediation_failed", alert, reason))
    assert out is not None and isinstance(out.body, bytes)
    return out.body


def test_the_webhook_body_stays_under_the_receivers_64_kib_and_stays_valid():
    assert webhook.WEBHOOK_BODY_MAX_BYTES == WEBHOOK_MAX_BYTES
    labels = {f"{i}{EMOJI * 98}": EMOJI * 300 for i in range(40)}
    alert = incident(alert_name=EMOJI * 300, summary=EMOJI * 2000, labels=labels,
                     annotations={"runbook_url": "https://rb.example/" + EMOJI * 2029})
    raw = webhook_body(alert, EMOJI * 2000)
    assert len(raw) <= webhook.WEBHOOK_BODY_MAX_BYTES
    body = json.loads(raw)
    assert webhook_problems(body) == []
    # Shrunk, not emptied: every label kept, each cut and marked as cut.
    assert len(body["incident"]["labels"]) == 32
    assert all(v.endswith("…") for v in body["incident"]["labels"].values())
    assert body["incident"]["summary"].startswith(EMOJI) and body["reason"].endswith("…")


def test_a_webhook_body_that_fits_is_sent_as_before():
    alert = incident(annotations={"runbook_url": "https://rb.example/disk"})
    body = json.loads(webhook_body(alert, "verify failed"))
    assert body["incident"]["labels"] == {"service": "payments"} and body["reason"] == "verify failed"
    assert body["incident"]["links"]["runbook"] == "https://rb.example/disk"


def test_webhook_shrinking_never_splits_a_user_perceived_character():
    family = "👨\u200d👩\u200d👧\u200d👦"
    alert = incident(labels={f"k{i}": family * 200 for i in range(32)})
    labels = json.loads(webhook_body(alert))["incident"]["labels"]
    assert all(v == family * ((len(v) - 1) // len(family)) + "…" for v in labels.values())


HUGE = 1_000_000


@pytest.mark.parametrize("head", ["x", "é" * 3 + "e\u0301", "👩\u200d🚒", "\u202e", "a&<b>*_~`", "می\u200cخواهم"])
def test_a_huge_piece_is_cut_as_a_moderately_large_one_is(head):
    """Only the part of a piece a cut can show is read: a megabyte behind
    it changes nothing (the same output as the old code gave, checked
    against it for moderately large inputs when this was written)."""
    moderate, huge = head * (7000 // len(head) + 1), head * (HUGE // len(head))
    for limit in (1, 7, 150, 2000, 3000):
        assert slack.fit([huge], limit) == slack.fit([moderate], limit)
        assert teams.escape and fit([huge], limit, teams.escape) == fit([moderate], limit, teams.escape)
        assert utf16_len(slack.fit([huge], limit)) <= limit


def test_pagerduty_details_of_megabytes_are_cut_as_before():
    def actions(error_size: int) -> list[dict]:
        return [{"action": "restart_pods", "target": "production/payments", "success": False,
                 "error": ("e\u0301\u202e" + EMOJI) * (error_size // 4)} for _ in range(20)]

    moderate = pagerduty.trigger_event(CONFIG, incident(remediation_actions=actions(200_000)), "rk", "remediation_failed", None)
    huge = pagerduty.trigger_event(CONFIG, incident(remediation_actions=actions(1_000_000)), "rk", "remediation_failed", None)
    assert huge == moderate
    assert len(json.dumps(huge).encode()) <= pagerduty.PAGERDUTY_EVENT_MAX_BYTES


def test_slack_leaves_alert_text_verbatim():
    alert = incident(alert_name="see https://evil.example #general @here", summary="<!channel> #ops https://x.example")
    message = slack.slack_message(CONFIG, alert, "opened", "by @ops")
    mrkdwn = [t for b in message["blocks"] for t in ([b["text"]] if "text" in b else []) + b.get("fields", []) + b.get("elements", [])
              if t["type"] == "mrkdwn"]
    assert mrkdwn and all(t["verbatim"] is True for t in mrkdwn)
    assert "&lt;!channel&gt;" in json.dumps(message)


CONTROLS = "red\x1b[31m bell\x07 back\x08 soh\x01 ls\u2028ps\u2029"
SHOWN = "red‹U+001B›[31m bell‹U+0007› back‹U+0008› soh‹U+0001› ls‹U+2028›ps‹U+2029›"
# The summary is the first line of the annotation: Python's str.splitlines
# ends one at U+2028 too.
FIRST_LINE = "red‹U+001B›[31m bell‹U+0007› back‹U+0008› soh‹U+0001› ls"


def test_control_characters_are_shown_in_every_field_people_read():
    alert = incident(alert_name="Disk\tFull\n" + CONTROLS, summary=CONTROLS,
                     description="line one\nline two\ttabbed " + CONTROLS + ".", labels={"service": "pay\x1bments", "namespace": "prod\x07"})
    page = pagerduty.trigger_event(CONFIG, alert, "rk", "opened", None)["payload"]
    assert page["summary"] == f"Disk‹U+0009›Full‹U+000A›{SHOWN} - {FIRST_LINE}"
    assert (page["source"], page["component"], page["group"]) == ("pay‹U+001B›ments", "pay‹U+001B›ments", "prod‹U+0007›")
    assert page["class"] == f"Disk‹U+0009›Full‹U+000A›{SHOWN}"
    # A description holds lines: its line feeds and tabs are text.
    assert page["custom_details"]["description"] == f"line one\nline two\ttabbed {SHOWN}."

    message = slack.slack_message(CONFIG, alert, "opened", None)
    assert message["blocks"][0]["text"]["text"] == f"[P0] Disk‹U+0009›Full‹U+000A›{SHOWN} opened"
    assert FIRST_LINE in message["text"] and "\x1b" not in json.dumps(message, ensure_ascii=False)
    assert f"{FIRST_LINE}\nline one\nline two\ttabbed {SHOWN}" + "." in message["blocks"][1]["text"]["text"]

    card = json.dumps(teams.teams_message(CONFIG, alert, "opened", None), ensure_ascii=False)
    assert not any(c in card for c in "\x1b\x07\x08\x01\u2028\u2029")
    assert "Disk‹U\\\\+0009›Full‹U\\\\+000A›red‹U\\\\+001B›" in card


def test_the_stored_alert_text_is_left_as_it_came():
    alert = incident(summary="red\x1b[31m bell\x07")
    pagerduty.trigger_event(CONFIG, alert, "rk", "opened", None)
    slack.slack_message(CONFIG, alert, "opened", None)
    assert alert["summary"] == "red\x1b[31m bell\x07"
    # The webhook is read by programs: the text as stored.
    assert json.loads(webhook_body(alert))["incident"]["summary"] == "red\x1b[31m bell\x07"
