"""Prometheus AlertManager webhooks (payload version 4), ``POST /webhook/alert``.

The seed's source. Every alert of a group is handled by its own status and
fingerprint; AlertManager's fingerprint is kept, or derived like AlertManager
does when a relay left it out.
"""

from __future__ import annotations

from typing import Any

from functions.intake.sources.base import Source
from shared.alerts import (
    MISSING,
    Alert,
    InvalidPayload,
    Parsed,
    alert_name_of,
    build,
    fingerprint_of,
    group_envelope,
    is_legacy_grafana,
    parse_group,
    parse_time,
    priority_of,
    status_of,
    string_map,
    summary_from,
    version_text,
)
from shared.config import Settings

NAME = "alertmanager"
# Version 3 (older AlertManagers) carries the same alert objects; relays that
# re-send AlertManager's groups sometimes leave the version out.
ACCEPTED_VERSIONS = ("3", "4")


def parse(payload: Any, config: Settings) -> Parsed:
    """Alert by alert. Raises :class:`InvalidPayload` only when nothing can
    be stored: not an object, a version other than 3 or 4, no list of
    alerts, or every alert rejected."""
    if not isinstance(payload, dict):
        raise InvalidPayload("", "the payload must be a JSON object")
    if is_legacy_grafana(payload):
        raise InvalidPayload("", "this is a legacy Grafana alerting notification (ruleName, state): post it to /webhook/grafana")
    version = version_text(payload.get("version"))
    if version is not None and version not in ACCEPTED_VERSIONS:
        # Grafana-managed alerting sends version "1"; pointed here by mistake,
        # its contact point shows this message, so it names the right route.
        where = "; Grafana-managed alerting posts to /webhook/grafana" if version == "1" else ""
        raise InvalidPayload("version", f"must be \"4\" (AlertManager webhook version 4; \"3\" is accepted too), got {version!r}{where}")
    items = parse_group(payload.get("alerts"), lambda raw, path: parse_alert(raw, path, config))
    return group_envelope(payload, items)


def parse_alert(raw: Any, path: str, config: Settings, source: str = NAME, fallback_name: str = "",
                extra_annotations=lambda raw: {}) -> Alert:
    """One alert of AlertManager's shape. Grafana's own Alertmanager sends the
    same shape: its source passes the group's name for alerts without one and
    the links it adds, which an annotation of the rule's own overrides."""
    if not isinstance(raw, dict):
        raise InvalidPayload(path, "must be an object")
    labels = string_map(raw.get("labels", MISSING), f"{path}.labels", required=True)
    if not labels.get("alertname", "").strip() and fallback_name:
        labels["alertname"] = fallback_name
    annotations = string_map(raw.get("annotations", MISSING), f"{path}.annotations", compound_as_json=True)
    alert_name = alert_name_of(labels, f"{path}.labels.alertname")
    annotations = {**extra_annotations(raw), **annotations}
    return build(
        labels=labels,
        annotations=annotations,
        status=status_of(raw.get("status"), f"{path}.status"),
        fingerprint=fingerprint_of(raw.get("fingerprint", MISSING), labels, f"{path}.fingerprint"),
        alert_name=alert_name,
        priority=priority_of(labels, config),
        summary=summary_from(annotations),
        description=annotations.get("description", ""),
        starts_at=parse_time(raw.get("startsAt", MISSING), f"{path}.startsAt"),
        ends_at=parse_time(raw.get("endsAt", MISSING), f"{path}.endsAt"),
        source=source,
        config=config,
    )


SOURCE = Source(name=NAME, parse=parse, routes=("/webhook/alert",), group_commit=True)
