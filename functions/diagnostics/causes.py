"""Probable causes from the facts of one diagnosis: deterministic rules, each
reading named facts and citing their ids, ranked by confidence (ties in the
order of the vocabulary). No rule fires: ``unknown``, citing the sources
that were read. docs/diagnosis.md documents each rule.

A rule is a function of a ``Facts`` view returning ``Cause`` or None; the
confidences are fixed numbers, so the same facts always give the same
ranking, summaries and evidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from shared.diagnosis import VOCABULARY

CAUSES_MAX = 5
EVIDENCE_MAX = 8
SUMMARY_MAX_CHARS = 300
# Prometheus metrics resource_saturation reads (names under `metrics:` in probes.yaml).
CPU_THROTTLING = "cpu_throttling"          # throttled CFS periods / all periods, 0–1
MEMORY_LIMIT_RATIO = "memory_limit_ratio"  # working set / memory limit, 0–1
CPU_THROTTLING_HIGH = 0.25
MEMORY_NEAR_LIMIT = 0.9

PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError"}
DISK_WORDS = re.compile(r"ephemeral-storage|nodefs|imagefs|disk", re.I)


@dataclass(frozen=True)
class Cause:
    cause: str
    confidence: float
    summary: str
    evidence: tuple[str, ...]

    def as_dict(self) -> dict:
        summary = self.summary if len(self.summary) <= SUMMARY_MAX_CHARS else self.summary[: SUMMARY_MAX_CHARS - 1] + "…"
        return {"cause": self.cause, "confidence": round(self.confidence, 2), "summary": summary,
                "evidence": list(dict.fromkeys(self.evidence))[:EVIDENCE_MAX]}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


class Facts:
    """Read-only views of a stored diagnosis that the rules share."""

    def __init__(self, d: dict):
        self.d = d
        pods = d.get("pods")
        self.pods = [p for s in (pods.values() if isinstance(pods, dict) else []) if isinstance(s, dict)
                     for p in _list(s.get("pods"))]
        self.events = _list(d.get("events"))
        self.logs = _list(d.get("logs"))
        changes = d.get("changes") if isinstance(d.get("changes"), dict) else {}
        self.revisions = _list(changes.get("revisions"))
        self.diff = changes.get("diff") if isinstance(changes.get("diff"), dict) else None
        self.config = _list(changes.get("config"))
        self.nodes = [n for n in _list(d.get("nodes")) if "error" not in n]
        self.metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
        self.dependencies = d.get("dependencies") if isinstance(d.get("dependencies"), dict) else {}
        self.sources = _list(d.get("sources"))

    def containers(self, pod: dict) -> list[dict]:
        return _list(pod.get("containers"))

    def events_where(self, reasons: Iterable[str] = (), message: str | None = None, kind: str | None = None) -> list[dict]:
        reasons = set(reasons)
        pattern = re.compile(message, re.I) if message else None
        return [e for e in self.events
                if (not reasons or e.get("reason") in reasons)
                and (pattern is None or pattern.search(e.get("message") or ""))
                and (kind is None or (e.get("object") or "").startswith(kind + "/"))]

    def logs_of(self, pods: Iterable[dict], previous_first: bool = True) -> list[dict]:
        names = {p["name"] for p in pods}
        found = [entry for entry in self.logs if entry.get("pod") in names and "error" not in entry]
        return sorted(found, key=lambda entry: (not entry.get("previous") if previous_first else entry.get("previous"), entry["id"]))

    def failing(self) -> list[dict]:
        return [p for p in self.pods if (not p.get("ready") and p.get("phase") != "Succeeded")
                or any(c.get("restarts") for c in self.containers(p))]

    def last_line(self, pods: Iterable[dict]) -> tuple[str | None, str | None]:
        """(log fact id, its last non-empty line) of the first failing log."""
        for entry in self.logs_of(pods):
            lines = [ln.strip() for ln in entry.get("lines") or [] if ln.strip()]
            if lines:
                return entry["id"], lines[-1]
        return None, None


def _ids(items: Iterable[dict]) -> list[str]:
    return [i["id"] for i in items if isinstance(i, dict) and i.get("id")]


def _names(pods: list[dict], limit: int = 3) -> str:
    names = sorted(p["name"] for p in pods)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _quote(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return f"“{text if len(text) <= limit else text[: limit - 1] + '…'}”"


# --------------------------------------------------------------------------- rules


def image_pull_failure(f: Facts) -> Cause | None:
    pods = [p for p in f.pods if any(c.get("state") == "waiting" and c.get("reason") in PULL_REASONS for c in f.containers(p))]
    events = f.events_where(("Failed", "BackOff", "ErrImagePull", "InspectFailed"), r"pull|image")
    if not pods and not events:
        return None
    images = sorted({c.get("image") for p in pods for c in f.containers(p) if c.get("reason") in PULL_REASONS and c.get("image")})
    detail = f" {_quote(events[0]['message'])}" if events else ""
    what = f"image {images[0]}" if images else "its image"
    return Cause("image_pull_failure", 0.95 if pods else 0.7,
                 f"{len(pods) or 'Some'} pod(s) cannot pull {what}.{detail}", tuple(_ids(pods) + _ids(events)))


def oom_killed(f: Facts) -> Cause | None:
    pods = [p for p in f.pods if any("OOMKilled" in (c.get("reason"), c.get("last_reason")) for c in f.containers(p))]
    events = f.events_where(("OOMKilling", "OOMKilled")) + f.events_where(message=r"OOMKilled|out of memory")
    if not pods and not events:
        return None
    logs = f.logs_of(pods)[:2]
    limit = ""
    limits = [line for line in (f.diff or {}).get("changes", []) if "limits.memory" in line]
    if limits:
        limit = f" (the last rollout changed {limits[0].split(' ', 2)[2]})"
    return Cause("oom_killed", 0.9 if pods else 0.65,
                 f"{len(pods)} pod(s) were killed for running out of memory{limit}: {_names(pods) or 'see the events'}.",
                 tuple(_ids(pods) + _ids(events) + _ids(logs)))


def crash_loop(f: Facts) -> Cause | None:
    pods = [p for p in f.pods if any(c.get("reason") == "CrashLoopBackOff"
                                     or (c.get("restarts", 0) >= 3 and c.get("last_reason") not in (None, "Completed"))
                                     for c in f.containers(p))]
    events = f.events_where(("BackOff",), r"restarting failed container")
    if not pods and not events:
        return None
    codes = sorted({c.get("last_exit_code") for p in pods for c in f.containers(p) if c.get("last_exit_code") is not None})
    log_id, line = f.last_line(pods)
    said = f" Its last log line: {_quote(line)}." if line else ""
    exits = f" exiting with code {', '.join(map(str, codes))}" if codes else ""
    confidence = 0.85 if pods else 0.6
    return Cause("crash_loop", confidence, f"{len(pods) or 'Some'} pod(s) restart in a loop{exits}.{said}",
                 tuple(_ids(pods) + ([log_id] if log_id else []) + _ids(events)))


def unschedulable(f: Facts) -> Cause | None:
    pods = [p for p in f.pods if p.get("unschedulable")]
    events = f.events_where(("FailedScheduling",))
    if not pods and not events:
        return None
    why = pods[0]["unschedulable"] if pods else events[0].get("message") or ""
    return Cause("unschedulable", 0.9 if pods else 0.6,
                 f"{len(pods) or 'Some'} pod(s) cannot be scheduled: {_quote(why)}.", tuple(_ids(pods) + _ids(events)))


def liveness_failing(f: Facts) -> Cause | None:
    events = f.events_where(("Unhealthy",), r"liveness probe failed") + f.events_where(("Killing",), r"liveness")
    if not events:
        return None
    names = {e["object"].split("/", 1)[1] for e in events if e["object"].startswith("Pod/")}
    pods = [p for p in f.pods if p["name"] in names]
    restarted = [p for p in pods if p.get("restarts")]
    return Cause("liveness_failing", 0.88 if restarted else 0.7,
                 f"The liveness probe fails, so the kubelet restarts the containers {_quote(events[0].get('message') or '')}.",
                 tuple(_ids(events) + _ids(pods)))


def readiness_failing(f: Facts) -> Cause | None:
    events = f.events_where(("Unhealthy",), r"readiness probe failed")
    running_unready = [p for p in f.pods if p.get("phase") == "Running" and not p.get("ready")
                       and f.containers(p) and all(c.get("state") == "running" for c in f.containers(p))]
    if not events and not running_unready:
        return None
    if events:
        confidence = 0.8 if running_unready else 0.5
        why = f" {_quote(events[0].get('message') or '')}"
    else:
        confidence, why = 0.55, " No probe event says why."
    return Cause("readiness_failing", confidence,
                 f"{len(running_unready)} pod(s) run but are not ready: the readiness probe fails.{why}",
                 tuple(_ids(events) + _ids(running_unready)))


def _new_revision_tie(f: Facts) -> tuple[dict | None, list[dict], list[dict]]:
    """(the rollout in the window, failing pods of its revision, failing pods of older ones)."""
    current = next((r for r in f.revisions if r.get("current")), None)
    if not current or not current.get("in_window") or f.diff is None:
        return None, [], []
    # A pod on a node that is not ready fails for the node, not its revision.
    lost = {n["name"] for n in f.nodes if n.get("not_ready")}
    failing = [p for p in f.failing() if p.get("node") not in lost]
    new = [p for p in failing if p.get("template_hash") and p.get("template_hash") == current.get("template_hash")]
    old = [p for p in failing if p not in new]
    return current, new, old


def bad_rollout(f: Facts) -> Cause | None:
    current, new, old = _new_revision_tie(f)
    if current is None:
        return None
    changes = (f.diff or {}).get("changes") or []
    evidence = [current["id"]] + ([f.diff["id"]] if f.diff else []) + _ids(new)
    cause = f" ({current['change_cause']})" if current.get("change_cause") else ""
    what = f": {'; '.join(changes[:3])}" if changes else " (the pod template did not change: a restart)"
    if new and not old and changes:
        confidence = 0.97
    elif new and changes:
        confidence = 0.75
    elif new:
        confidence = 0.6
    else:
        confidence = 0.35 if changes else 0.2
    failing = f"; {len(new)} failing pod(s) run the new revision" if new else "; no failing pod runs it"
    return Cause("bad_rollout", confidence,
                 f"Revision {current['revision']} rolled out at {current['created']}, before the alert{cause}{what}{failing}.",
                 tuple(evidence))


def config_change(f: Facts) -> Cause | None:
    failing = f.failing()
    changed = [c for c in f.config if c.get("in_window")]
    missing = [c for c in f.config if c.get("error") == "not found"]
    config_errors = [p for p in f.pods if any(c.get("reason") in CONFIG_REASONS for c in f.containers(p))]
    if missing and config_errors:
        return Cause("config_change", 0.92, f"ConfigMap {missing[0]['name']} the pods read does not exist; "
                     f"{len(config_errors)} pod(s) cannot start ({config_errors[0]['waiting_reasons'][0]}).",
                     tuple(_ids(missing) + _ids(config_errors)))
    if not changed or not failing:
        return None
    tied, new, _ = _new_revision_tie(f)
    strong_rollout = bool(tied and new and (f.diff or {}).get("changes"))
    names = ", ".join(c["name"] for c in changed[:3])
    return Cause("config_change", 0.6 if strong_rollout else 0.88,
                 f"ConfigMap {names} changed at {changed[0]['changed_at']}, before the alert, and {len(failing)} pod(s) "
                 f"reading it fail.", tuple(_ids(changed) + _ids(failing)))


def dependency_down(f: Facts) -> Cause | None:
    down = sorted(name for name, state in f.dependencies.items() if state == "down")
    if not down:
        return None
    pattern = re.compile("|".join(re.escape(n) for n in down), re.I)
    mentions = [entry for entry in f.logs if any(pattern.search(line) for line in entry.get("lines") or [])]
    crashing = [p for p in f.pods if any(c.get("reason") in PULL_REASONS | {"CrashLoopBackOff"} or "OOMKilled" in (c.get("last_reason"),)
                                         for c in f.containers(p))]
    confidence = (0.82 if not crashing else 0.6) + (0.1 if mentions else 0.0)
    said = f"; the logs name it ({mentions[0]['id']})" if mentions else ""
    return Cause("dependency_down", confidence, f"Dependency {', '.join(down)} is down{said}.",
                 tuple([f"dependency/{n}" for n in down] + _ids(mentions)))


def node_not_ready(f: Facts) -> Cause | None:
    nodes = [n for n in f.nodes if n.get("not_ready")]
    if not nodes:
        return None
    names = {n["name"] for n in nodes}
    pods = [p for p in f.pods if p.get("node") in names]
    events = [e for e in f.events_where(("NodeNotReady", "NodeNotSchedulable")) if e["object"].split("/", 1)[1] in names or e["object"].startswith("Pod/")]
    state = nodes[0]["conditions"].get("Ready", "Unknown")
    return Cause("node_not_ready", 0.92, f"Node {', '.join(sorted(names))} is not ready (Ready={state}); "
                 f"{len(pods)} of the pods run there.", tuple(_ids(nodes) + _ids(events) + _ids(pods)))


def disk_pressure(f: Facts) -> Cause | None:
    nodes = [n for n in f.nodes if "DiskPressure" in n.get("pressure", [])]
    events = f.events_where(("EvictionThresholdMet", "FreeDiskSpaceFailed", "ImageGCFailed"), DISK_WORDS.pattern)
    evicted = [p for p in f.pods if p.get("reason") == "Evicted" and DISK_WORDS.search(p.get("message") or "")]
    if not nodes and not evicted and not events:
        return None
    where = f"node {', '.join(n['name'] for n in nodes)}" if nodes else "the node"
    confidence = 0.9 if nodes or evicted else 0.6
    return Cause("disk_pressure", confidence, f"{where[0].upper()}{where[1:]} is short of disk"
                 + (f"; {len(evicted)} pod(s) were evicted for it." if evicted else "."),
                 tuple(_ids(nodes) + _ids(evicted) + _ids(events)))


def evicted(f: Facts) -> Cause | None:
    pods = [p for p in f.pods if p.get("reason") == "Evicted"]
    events = f.events_where(("Evicted",))
    if not pods and not events:
        return None
    why = (pods[0].get("message") if pods else None) or (events[0].get("message") if events else "") or ""
    on_disk = bool(DISK_WORDS.search(why))
    return Cause("evicted", 0.8 if on_disk else 0.87, f"{len(pods) or 'Some'} pod(s) were evicted: {_quote(why)}.",
                 tuple(_ids(pods) + _ids(events)))


def resource_saturation(f: Facts) -> Cause | None:
    cpu, memory = f.metrics.get(CPU_THROTTLING), f.metrics.get(MEMORY_LIMIT_RATIO)
    cpu = cpu if isinstance(cpu, (int, float)) else None
    memory = memory if isinstance(memory, (int, float)) else None
    parts, evidence, confidence = [], [], 0.0
    if cpu is not None and cpu >= CPU_THROTTLING_HIGH:
        parts.append(f"CPU throttled {cpu:.0%} of the time")
        evidence.append(f"metric/{CPU_THROTTLING}")
        confidence = max(confidence, min(0.85, 0.6 + (cpu - CPU_THROTTLING_HIGH)))
    if memory is not None and memory >= MEMORY_NEAR_LIMIT:
        parts.append(f"memory at {memory:.0%} of its limit")
        evidence.append(f"metric/{MEMORY_LIMIT_RATIO}")
        confidence = max(confidence, 0.8 if memory >= 0.95 else 0.7)
    if not parts:
        return None
    if len(parts) == 2:
        confidence = min(0.9, confidence + 0.05)
    return Cause("resource_saturation", confidence, f"The containers are saturated: {' and '.join(parts)}.", tuple(evidence))


RULES: tuple[Callable[[Facts], Cause | None], ...] = (
    bad_rollout, config_change, image_pull_failure, unschedulable, node_not_ready, disk_pressure, oom_killed,
    liveness_failing, dependency_down, crash_loop, evicted, readiness_failing, resource_saturation,
)


def rank(diagnostics: dict) -> list[dict]:
    """The probable causes, most likely first; ``unknown`` alone when no rule fires."""
    facts = Facts(diagnostics)
    found = [c for c in (rule(facts) for rule in RULES) if c is not None and c.evidence]
    found.sort(key=lambda c: (-round(c.confidence, 2), VOCABULARY.index(c.cause)))
    if not found:
        looked = _ids(facts.sources) or ["source/pods"]
        failed = [s["name"] for s in facts.sources if s.get("state") != "ok"]
        gap = f" ({', '.join(failed)} could not be read)" if failed else ""
        return [Cause("unknown", 0.0, f"No rule matched the facts collected{gap}; the cause is not known.", tuple(looked)).as_dict()]
    return [c.as_dict() for c in found[:CAUSES_MAX]]
