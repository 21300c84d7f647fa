"""The alerting pipeline's dead man's switch.

kube-prometheus fires ``Watchdog`` forever, so that its *absence* means
Prometheus, AlertManager or the path to us is broken. Each Watchdog that
arrives records when its pipeline was last seen (``heartbeats``, one row per
cluster/source as the labels tell them apart). The sweep opens a P0
"alerting pipeline silent" incident for a pipeline not seen for
``HEARTBEAT_TIMEOUT_SECONDS``, and the next Watchdog from it resolves that
incident. A pipeline never seen has no row, so a fresh install (or one that
does not run kube-prometheus) never pages for it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.alerts import Alert
from shared.sqltext import compact

ALERT_NAME = "AlertingPipelineSilent"
ACTOR = "heartbeat"
# Labels that name a pipeline: kube-prometheus adds ``prometheus``
# (namespace/name), a multi-cluster setup adds ``cluster``.
KEY_LABELS = ("cluster", "prometheus", "prometheus_replica_set", "source")

_SEEN = sa.text(compact(
    """
    INSERT INTO heartbeats (key, labels, source, first_seen_at, last_seen_at)
    SELECT x.key, x.labels, x.source, :now, :now
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(key text, labels jsonb, source text)
    ORDER BY x.key
    ON CONFLICT (key) DO UPDATE SET last_seen_at = GREATEST(heartbeats.last_seen_at, :now), labels = EXCLUDED.labels
    """
))

def key_of(alert: Alert) -> tuple[str, dict]:
    labels = {name: alert.labels[name] for name in KEY_LABELS if alert.labels.get(name)}
    key = alert.source + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))
    return key[:300], labels


def fingerprint_of(key: str) -> str:
    return "heartbeat-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def is_heartbeat(alert: Alert, names: Sequence[str]) -> bool:
    return alert.status == "firing" and alert.alert_name in names


def seen(conn: Connection, heartbeats: Sequence[Alert], now: datetime) -> list[Alert]:
    """Record the Watchdogs; returns the resolutions of the silent incidents
    their pipelines had open (for the caller to record with the batch)."""
    if not heartbeats:
        return []
    rows = {}
    for alert in heartbeats:
        key, labels = key_of(alert)
        rows[key] = {"key": key, "labels": labels, "source": alert.source}
    conn.execute(_SEEN, {"rows": json.dumps(list(rows.values())), "now": now})
    fingerprints = {fingerprint_of(k): k for k in rows}
    active = conn.execute(sa.text("SELECT fingerprint FROM incidents WHERE status IN ('open', 'investigating') "
                                  "AND fingerprint IN (SELECT jsonb_array_elements_text(CAST(:f AS jsonb)))"),
                          {"f": json.dumps(list(fingerprints))}).scalars().all()
    return [_alert(fingerprints[f], rows[fingerprints[f]]["labels"], rows[fingerprints[f]]["source"], "resolved", now, 0)
            for f in sorted(active)]


def silent(conn: Connection, now: datetime, timeout_seconds: int) -> list[Alert]:
    """The firing "pipeline silent" alerts for every pipeline past its
    timeout that has no such incident open yet."""
    rows = conn.execute(sa.text("SELECT key, labels, source, last_seen_at FROM heartbeats WHERE last_seen_at < :cutoff ORDER BY key"),
                        {"cutoff": now - timedelta(seconds=timeout_seconds)}).mappings().all()
    if not rows:
        return []
    fingerprints = [fingerprint_of(r["key"]) for r in rows]
    active = set(conn.execute(sa.text("SELECT fingerprint FROM incidents WHERE status IN ('open', 'investigating') "
                                      "AND fingerprint IN (SELECT jsonb_array_elements_text(CAST(:f AS jsonb)))"),
                              {"f": json.dumps(fingerprints)}).scalars())
    return [_alert(r["key"], r["labels"], r["source"], "firing", now, int((now - r["last_seen_at"]).total_seconds()))
            for r in rows if fingerprint_of(r["key"]) not in active]


def _alert(key: str, labels: dict, source: str, status: str, now: datetime, silent_for: int) -> Alert:
    where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or source
    summary = f"alerting pipeline silent: no Watchdog from {where} for {silent_for // 60} min"
    return Alert(
        fingerprint=fingerprint_of(key), status=status, alert_name=ALERT_NAME, priority="P0",
        summary=summary if status == "firing" else "alerting pipeline silent",
        description=("The Watchdog alert, which kube-prometheus fires continuously, has stopped arriving: "
                     "Prometheus, AlertManager or the way from them to the intake is broken, so other alerts "
                     "may not be arriving either."),
        labels={"alertname": ALERT_NAME, "severity": "critical", **labels, "heartbeat": key},
        annotations={"summary": "alerting pipeline silent"},
        starts_at=now if status == "firing" else None, ends_at=now if status == "resolved" else None, source=source,
    )
