"""The one-line summary every view shows (API, board, events, pages) comes
from whatever the rule set writes, never empty while the alert says something."""

import pytest

from functions.intake.sources import alertmanager, cloudevent
from tests.factories import SETTINGS, webhook


def _group_alert(annotations):
    return {"status": "firing", "labels": {"alertname": "DiskFull", "severity": "critical"}, "annotations": annotations,
            "startsAt": "2026-11-27T21:54:18Z", "endsAt": "0001-01-01T00:00:00Z"}


@pytest.mark.parametrize("annotations, summary", [
    ({"summary": "Disk full", "title": "ignored", "description": "ignored"}, "Disk full"),
    ({"message": "Disk full on db-1"}, "Disk full on db-1"),
    ({"title": "[FIRING:1] DiskFull"}, "[FIRING:1] DiskFull"),
    ({"summary": "  ", "title": "Grafana title"}, "Grafana title"),
    ({"description": "\n\n  Disk on db-1 is 99% full.\nIt fills at 1 GB/h."}, "Disk on db-1 is 99% full."),
    ({}, ""),
])
def test_the_summary_falls_back_from_summary_to_message_title_and_the_descriptions_first_line(annotations, summary):
    (alert,) = alertmanager.parse(webhook([_group_alert(annotations)]), SETTINGS).alerts
    assert alert.summary == summary


def test_a_report_without_a_summary_takes_its_descriptions_first_line_over_the_annotations():
    alert = cloudevent.parse_report({"alert_name": "DiskFull", "description": "Disk 99% full\nmore",
                          "annotations": {"description": "older text"}}, SETTINGS)
    assert alert.summary == "Disk 99% full"
