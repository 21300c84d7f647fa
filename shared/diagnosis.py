"""Reading a stored diagnosis (functions/diagnostics writes it): its facts by
id, and its probable causes, for the board, the report and the channels.
docs/diagnosis.md describes the shape."""

from __future__ import annotations

import re
from typing import Any, Iterator

_NOT_ANCHOR = re.compile(r"[^A-Za-z0-9_.-]")

# What functions/diagnostics/causes.py may conclude (docs/diagnosis.md); the
# order breaks ties between equally confident causes.
VOCABULARY = (
    "bad_rollout", "config_change", "image_pull_failure", "unschedulable", "node_not_ready", "disk_pressure",
    "oom_killed", "liveness_failing", "dependency_down", "crash_loop", "evicted", "readiness_failing",
    "resource_saturation", "unknown",
)


def _items(value: Any) -> list:
    """The dicts with an id in a stored list (older diagnoses have none)."""
    return [v for v in value if isinstance(v, dict) and isinstance(v.get("id"), str)] if isinstance(value, list) else []


def facts(diagnostics: Any) -> Iterator[tuple[str, str, str]]:
    """(id, section, one line describing it) of every fact, in stored order.
    Written for diagnoses as collector.py stores them; older ones lack the
    newer sections and yield fewer facts."""
    d = diagnostics if isinstance(diagnostics, dict) else {}
    pods = d.get("pods")
    for section in (pods.values() if isinstance(pods, dict) else []):
        for pod in _items(section.get("pods") if isinstance(section, dict) else None):
            state = ", ".join(pod.get("waiting_reasons") or []) or pod.get("reason") or pod.get("phase") or "?"
            last = f", last terminated {', '.join(pod['last_terminated_reasons'])}" if pod.get("last_terminated_reasons") else ""
            yield pod["id"], "pods", f"{pod.get('name')}: {'ready' if pod.get('ready') else 'not ready'}, {state}, {pod.get('restarts', 0)} restarts{last}"
    for section, prefix in (("metrics", "metric"), ("dependencies", "dependency")):
        values = d.get(section)
        if isinstance(values, dict):
            for name, value in values.items():
                text = value["error"] if isinstance(value, dict) and "error" in value else value
                yield f"{prefix}/{name}", section, f"{name} = {text}"
    for event in _items(d.get("events")):
        yield event["id"], "events", f"{event.get('type')} {event.get('reason')} on {event.get('object')} ×{event.get('count')}: {event.get('message')}"
    for entry in _items(d.get("logs")):
        which = "previous container" if entry.get("previous") else "container"
        yield entry["id"], "logs", f"{entry.get('pod')}/{entry.get('container')} ({which}), {len(entry.get('lines') or [])} lines"
    changes = d.get("changes") if isinstance(d.get("changes"), dict) else {}
    for rev in _items(changes.get("revisions")):
        cause = f" — {rev['change_cause']}" if rev.get("change_cause") else ""
        yield rev["id"], "changes", f"revision {rev.get('revision')} created {rev.get('created')}{' (current)' if rev.get('current') else ''}{cause}"
    diff = changes.get("diff")
    if isinstance(diff, dict) and isinstance(diff.get("id"), str):
        yield diff["id"], "changes", f"revision {diff.get('from')} → {diff.get('to')}: {'; '.join(diff.get('changes') or []) or 'no template change'}"
    for item in _items(changes.get("config")):
        yield item["id"], "changes", f"{item.get('kind')} {item.get('name')}: " + (
            item["error"] if item.get("error") else f"changed {item.get('changed_at') or 'at an unknown time'}")
    for hpa in _items(changes.get("scaling")):
        yield hpa["id"], "changes", f"HPA {hpa.get('name')}: {hpa.get('current')} → {hpa.get('desired')} replicas (min {hpa.get('min')}, max {hpa.get('max')})"
    for node in _items(d.get("nodes")):
        if node.get("error"):
            yield node["id"], "nodes", f"{node.get('name')}: {node['error']}"
        else:
            yield node["id"], "nodes", f"{node.get('name')}: " + ", ".join(f"{k}={v}" for k, v in (node.get("conditions") or {}).items())
    for source in _items(d.get("sources")):
        yield source["id"], "sources", f"{source.get('name')}: {source.get('state')}" + (f" ({source['error']})" if source.get("error") else "")


def anchor(fact_id: Any) -> str:
    """An HTML id / URL fragment for a fact (safe in raw HTML and Markdown)."""
    return "fact-" + _NOT_ANCHOR.sub("-", str(fact_id))


def log_lines(diagnostics: Any) -> dict[str, list[str]]:
    """Log fact id → its (redacted) lines."""
    d = diagnostics if isinstance(diagnostics, dict) else {}
    return {e["id"]: [str(line) for line in e.get("lines") or [] if isinstance(e.get("lines"), list)] for e in _items(d.get("logs"))}


def fact_ids(diagnostics: Any) -> set[str]:
    return {fact_id for fact_id, _, _ in facts(diagnostics)}


def top_cause(diagnostics: Any) -> str | None:
    """The most likely cause, or None before a diagnosis."""
    causes = probable_causes(diagnostics, 1)
    return causes[0]["cause"] if causes else None


def probable_causes(diagnostics: Any, limit: int | None = None) -> list[dict]:
    """The stored causes that have the stored shape, best first."""
    causes = diagnostics.get("probable_causes") if isinstance(diagnostics, dict) else None
    good = [c for c in (causes if isinstance(causes, list) else []) if isinstance(c, dict) and isinstance(c.get("cause"), str)]
    return good[:limit] if limit else good
