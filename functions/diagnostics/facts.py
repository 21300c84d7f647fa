"""Facts about the target from the Kubernetes API, as plain JSON with a
stable ``id`` each: its pods' containers, the Events of its pods,
ReplicaSets, Deployment, HPAs and nodes, the last log lines of failing
containers (redacted), its rollout history and the ConfigMaps it reads, and
the conditions of its nodes.

Every call is bounded by ``timeout``; raw JSON is read (what
``_preload_content=False`` returns) because the client's model
deserialisation would spend most of the diagnosis budget. Ids derive from names Kubernetes gives (``event/<name>``,
``revision/<n>``), never from positions, so the same cluster state gives the
same ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from shared.log import redact_patterns

# Every Kubernetes call diagnostics makes, for the RBAC Roles (a test keeps
# knative/base/rbac.yaml equal to this, and another checks each request the
# loopback API server sees maps to one of these). Read verbs only.
NAMESPACED_PERMISSIONS = {
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods/log", "get"),
    ("", "events", "list"),
    ("", "configmaps", "get"),
    ("apps", "deployments", "get"),
    ("apps", "replicasets", "list"),
    ("autoscaling", "horizontalpodautoscalers", "list"),
}
# Nodes are cluster-scoped, and so is the list of a node's Events.
CLUSTER_PERMISSIONS = {
    ("", "nodes", "get"),
    ("", "events", "list"),
}

REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"
TEMPLATE_HASH = "pod-template-hash"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
NODE_CONDITIONS = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable")
LINE_MAX_CHARS = 400
MESSAGE_MAX_CHARS = 400


@dataclass(frozen=True)
class Limits:
    """Bounds of one diagnosis (``diagnosis:`` in probes.yaml)."""

    lookback_minutes: int = 60
    events_max: int = 20
    log_lines: int = 30
    log_bytes: int = 4096
    logged_pods_max: int = 3
    nodes_max: int = 5
    config_max: int = 10
    revisions_max: int = 5

    @classmethod
    def from_spec(cls, spec: dict | None) -> "Limits":
        spec = spec or {}
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown diagnosis settings: {', '.join(sorted(unknown))}")
        values = {}
        for name, value in spec.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"diagnosis.{name} must be a positive integer")
            values[name] = value
        return cls(**values)


# --------------------------------------------------------------------------- time


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Window:
    """What counts as recent: from ``lookback`` before the alert started."""

    start: datetime
    onset: datetime

    @classmethod
    def before(cls, onset: datetime, limits: Limits) -> "Window":
        lookback = timedelta(minutes=limits.lookback_minutes)
        # An onset within the lookback of year 1 (a sender's zero time written
        # in a zone east of UTC) has nothing before it: the window starts there.
        floor = datetime.min.replace(tzinfo=onset.tzinfo)
        return cls(onset - lookback if onset - floor > lookback else floor, onset)

    def holds(self, moment: datetime | None) -> bool:
        return moment is not None and moment >= self.start


# --------------------------------------------------------------------------- reading


class Reader:
    """Raw-JSON reads through the official client's ApiClient
    (shared/kuberaw.py: no generated API class, no model), each bounded by
    ``timeout``."""

    def __init__(self, api, timeout: float):
        self.api = api
        self.timeout = max(timeout, 0.05)

    def _get(self, path: str, path_params: dict, query: dict | None = None, accept: str = "application/json") -> bytes:
        from shared import kuberaw

        return kuberaw.request(self.api, "GET", path, path_params, query=query, accept=accept, timeout=self.timeout)

    def _json(self, path: str, path_params: dict, query: dict | None = None, accept: str = "application/json") -> dict:
        return json.loads(self._get(path, path_params, query, accept))

    def deployment(self, namespace: str, name: str) -> dict:
        return self._json("/apis/apps/v1/namespaces/{namespace}/deployments/{name}", {"name": name, "namespace": namespace})

    def pod(self, namespace: str, name: str) -> dict:
        return self._json("/api/v1/namespaces/{namespace}/pods/{name}", {"name": name, "namespace": namespace})

    def _items(self, path: str, path_params: dict, query: dict, what: str) -> list[dict]:
        # A page at a time, each within the timeout (kuberaw.LIST_PAGE_SIZE):
        # a namespace of thousands of pods is read, not timed out whole.
        from shared import kuberaw

        return kuberaw.items(self.api, path, path_params, query, what=what, timeout=self.timeout)

    def pods(self, namespace: str, selector: str) -> list[dict]:
        return self._items("/api/v1/namespaces/{namespace}/pods", {"namespace": namespace}, {"labelSelector": selector},
                           f"pods in {namespace} match {selector or 'everything'}")

    def events(self, namespace: str, limit: int) -> list[dict]:
        return self._json("/api/v1/namespaces/{namespace}/events", {"namespace": namespace}, {"limit": limit})["items"]

    def node_events(self, node: str, limit: int) -> list[dict]:
        selector = f"involvedObject.kind=Node,involvedObject.name={node}"
        return self._json("/api/v1/events", {}, {"fieldSelector": selector, "limit": limit})["items"]

    def replicasets(self, namespace: str, selector: str) -> list[dict]:
        return self._items("/apis/apps/v1/namespaces/{namespace}/replicasets", {"namespace": namespace},
                           {"labelSelector": selector}, f"ReplicaSets in {namespace} match {selector or 'everything'}")

    def hpas(self, namespace: str) -> list[dict]:
        return self._json("/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers", {"namespace": namespace})["items"]

    def node(self, name: str) -> dict:
        return self._json("/api/v1/nodes/{name}", {"name": name})

    def configmap_metadata(self, namespace: str, name: str) -> dict:
        # Metadata only: a ConfigMap's data is never transferred.
        return self._json("/api/v1/namespaces/{namespace}/configmaps/{name}", {"name": name, "namespace": namespace},
                          accept=METADATA_ONLY)

    def log(self, namespace: str, pod: str, container: str, previous: bool, lines: int, max_bytes: int) -> str:
        query = {"container": container, "limitBytes": max_bytes, "previous": previous, "tailLines": lines}
        data = self._get("/api/v1/namespaces/{namespace}/pods/{name}/log", {"name": pod, "namespace": namespace}, query)
        return data.decode("utf-8", "replace")


def describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status and reason:
        return f"HTTP {status} {reason}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _cut(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- pods


def _state(state: dict) -> tuple[str | None, str | None, str | None, int | None, str | None]:
    """(state, reason, message, exit code, finished at) of a container state."""
    for name in ("waiting", "terminated", "running"):
        if name in (state or {}):
            body = state[name] or {}
            return name, body.get("reason"), body.get("message"), body.get("exitCode"), body.get("finishedAt")
    return None, None, None, None, None


def container_facts(pod: dict) -> list[dict]:
    # A termination message is the log's tail under FallbackToLogsOnError:
    # redacted like the log, before it is cut (a cut secret escapes a pattern).
    out = []
    for status in sorted((pod.get("status") or {}).get("containerStatuses") or [], key=lambda s: s.get("name", "")):
        state, reason, message, code, _ = _state(status.get("state") or {})
        _, last_reason, _, last_code, last_finished = _state(status.get("lastState") or {})
        out.append({
            "name": status.get("name"), "image": status.get("image"), "ready": bool(status.get("ready")),
            "restarts": status.get("restartCount") or 0, "state": state, "reason": reason,
            "message": _cut(redact_patterns(str(message)), MESSAGE_MAX_CHARS) if message else None, "exit_code": code,
            "last_reason": last_reason, "last_exit_code": last_code, "last_finished": last_finished,
        })
    return out


def pod_fact(pod: dict) -> dict:
    meta, status, spec = pod.get("metadata") or {}, pod.get("status") or {}, pod.get("spec") or {}
    containers = container_facts(pod)
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    unschedulable = None
    if scheduled and scheduled.get("status") == "False":
        unschedulable = _cut(scheduled.get("message") or scheduled.get("reason") or "not scheduled", MESSAGE_MAX_CHARS)
    return {
        "id": f"pod/{meta.get('name')}",
        "name": meta.get("name"),
        "phase": status.get("phase"),
        "ready": bool(containers) and all(c["ready"] for c in containers),
        "restarts": sum(c["restarts"] for c in containers),
        "waiting_reasons": [c["reason"] for c in containers if c["state"] == "waiting" and c["reason"]],
        "last_terminated_reasons": [c["last_reason"] for c in containers if c["last_reason"]],
        "node": spec.get("nodeName"),
        "reason": status.get("reason"),
        "message": _cut(redact_patterns(str(status["message"])), MESSAGE_MAX_CHARS) if status.get("message") else None,
        "unschedulable": unschedulable,
        "template_hash": (meta.get("labels") or {}).get(TEMPLATE_HASH),
        "created": meta.get("creationTimestamp"),
        "containers": containers,
    }


def failing(pod: dict) -> bool:
    """A pod that is not doing its job, or restarted inside the diagnosis."""
    return (not pod["ready"] and pod["phase"] != "Succeeded") or any(c["restarts"] for c in pod["containers"])


def summarise_pods(pods: list[dict]) -> dict:
    details = sorted((pod_fact(p) for p in pods), key=lambda d: d["name"] or "")
    ready = sum(1 for d in details if d["ready"])
    waiting = [r for d in details for r in d["waiting_reasons"]]
    evicted = [d for d in details if d["reason"] == "Evicted"]
    if waiting:
        status = sorted(set(waiting), key=lambda r: (-waiting.count(r), r))[0]
    elif not details:
        status = "NoPods"
    elif evicted:
        status = "Evicted"
    elif all(d["phase"] == "Running" for d in details):
        status = "Running"
    else:
        phases = [d["phase"] or "Unknown" for d in details if d["phase"] != "Running"]
        status = sorted(set(phases), key=lambda p: (-phases.count(p), p))[0]
    return {
        "ready": f"{ready}/{len(details)}",
        "status": status,
        "restarts": sum(d["restarts"] for d in details),
        "waiting_reasons": sorted(set(waiting)),
        "last_terminated_reasons": sorted({r for d in details for r in d["last_terminated_reasons"]}),
        "nodes": sorted({d["node"] for d in details if d["node"]}),
        "pods": details,
    }


# --------------------------------------------------------------------------- events


def _event_time(event: dict) -> datetime | None:
    return parse_time(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
                      or (event.get("metadata") or {}).get("creationTimestamp"))


def event_facts(events: Iterable[dict], objects: set[tuple[str, str]], window: Window, limit: int) -> tuple[list[dict], int]:
    """The Events about ``objects`` ((kind, name) pairs) inside the window,
    warnings first then the most recent; and how many were left out."""
    chosen = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if (involved.get("kind"), involved.get("name")) not in objects:
            continue
        last = _event_time(event)
        if not window.holds(last):
            continue
        name = (event.get("metadata") or {}).get("name") or f"{involved.get('name')}.{event.get('reason')}"
        chosen[name] = {
            "id": f"event/{name}",
            "type": event.get("type") or "Normal",
            "reason": event.get("reason"),
            "object": f"{involved.get('kind')}/{involved.get('name')}",
            "message": _cut(redact_patterns(str(event.get("message") or "")), MESSAGE_MAX_CHARS),
            "count": event.get("count") or (event.get("series") or {}).get("count") or 1,
            "first": iso(parse_time(event.get("firstTimestamp") or event.get("eventTime")) or last),
            "last": iso(last),
        }
    ordered = sorted(chosen.values(), key=lambda e: (e["type"] != "Warning", _neg_time(e["last"]), e["id"]))
    return ordered[:limit], max(0, len(ordered) - limit)


def _neg_time(text: str | None) -> float:
    moment = parse_time(text)
    return -moment.timestamp() if moment else 0.0


# --------------------------------------------------------------------------- logs


def log_targets(pod_facts: list[dict], limit: int) -> list[tuple[str, str, bool]]:
    """(pod, container, previous) to read: failing containers of the first
    ``limit`` failing pods (not ready first), the previous instance of a
    restarted one too."""
    bad = sorted((p for p in pod_facts if failing(p)), key=lambda p: (p["ready"], p["name"]))[:limit]
    out = []
    for pod in bad:
        for c in pod["containers"]:
            if c["ready"] and not c["restarts"]:
                continue
            if c["state"] in ("running", "terminated"):
                out.append((pod["name"], c["name"], False))
            if c["restarts"]:
                out.append((pod["name"], c["name"], True))
    return out


def log_fact(pod: str, container: str, previous: bool, text: str, limits: Limits) -> dict:
    # Redacted whole before it is split: a private key spans lines.
    raw = redact_patterns(text).splitlines()
    lines = [_cut(line, LINE_MAX_CHARS) for line in raw[-limits.log_lines:]]
    return {
        "id": f"log/{pod}/{container}" + ("/previous" if previous else ""),
        "pod": pod, "container": container, "previous": previous, "lines": lines,
        "truncated": len(text.encode()) >= limits.log_bytes or len(raw) > limits.log_lines,
    }


# --------------------------------------------------------------------------- rollout history


def _revision(rs: dict) -> int:
    try:
        return int(((rs.get("metadata") or {}).get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


def owned_by(rs: dict, deployment: str) -> bool:
    return any(o.get("kind") == "Deployment" and o.get("name") == deployment for o in (rs.get("metadata") or {}).get("ownerReferences") or [])


def _env_names(container: dict) -> list[str]:
    return sorted({e.get("name") for e in container.get("env") or [] if e.get("name")})


def template_diff(old: dict, new: dict) -> list[str]:
    """What changed in the pod template, per container: images, env variable
    names (never values), resources, probes, command and args."""
    changes: list[str] = []
    old_c = {c.get("name"): c for c in ((old.get("spec") or {}).get("containers") or [])}
    new_c = {c.get("name"): c for c in ((new.get("spec") or {}).get("containers") or [])}
    for name in sorted(set(old_c) | set(new_c)):
        a, b = old_c.get(name), new_c.get(name)
        if a is None or b is None:
            changes.append(f"container {name} {'added' if a is None else 'removed'}")
            continue
        if a.get("image") != b.get("image"):
            changes.append(f"container {name} image {a.get('image')} → {b.get('image')}")
        added = sorted(set(_env_names(b)) - set(_env_names(a)))
        removed = sorted(set(_env_names(a)) - set(_env_names(b)))
        if added:
            changes.append(f"container {name} env added: {', '.join(added)}")
        if removed:
            changes.append(f"container {name} env removed: {', '.join(removed)}")
        changed_values = sorted(n for n in set(_env_names(a)) & set(_env_names(b))
                                if _env_value(a, n) != _env_value(b, n))
        if changed_values:
            changes.append(f"container {name} env changed: {', '.join(changed_values)}")
        for kind in ("limits", "requests"):
            before = (a.get("resources") or {}).get(kind) or {}
            after = (b.get("resources") or {}).get(kind) or {}
            for resource in sorted(set(before) | set(after)):
                if before.get(resource) != after.get(resource):
                    changes.append(f"container {name} {kind}.{resource} {before.get(resource, 'unset')} → {after.get(resource, 'unset')}")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if a.get(probe) != b.get(probe):
                changes.append(f"container {name} {probe} changed")
        for field in ("command", "args"):
            if a.get(field) != b.get(field):
                changes.append(f"container {name} {field} changed")
    return changes


def _env_value(container: dict, name: str) -> str:
    # Compared, never stored: a value may be a secret.
    entry = next((e for e in container.get("env") or [] if e.get("name") == name), {})
    return json.dumps({k: v for k, v in entry.items() if k != "name"}, sort_keys=True)


def rollout_facts(replicasets: list[dict], deployment: str, window: Window, limit: int) -> tuple[list[dict], dict | None]:
    """The Deployment's revisions (the current one, the one before it, and any
    created inside the window), newest first; and the template difference
    between the current and the previous revision."""
    owned = sorted((rs for rs in replicasets if owned_by(rs, deployment)), key=_revision, reverse=True)
    if not owned:
        return [], None
    facts = []
    for index, rs in enumerate(owned):
        meta, status = rs.get("metadata") or {}, rs.get("status") or {}
        created = parse_time(meta.get("creationTimestamp"))
        if index > 1 and not window.holds(created):
            continue
        facts.append({
            "id": f"revision/{_revision(rs)}",
            "revision": _revision(rs),
            "replicaset": meta.get("name"),
            "template_hash": (meta.get("labels") or {}).get(TEMPLATE_HASH),
            "created": iso(created),
            "in_window": window.holds(created) and created <= window.onset,
            "change_cause": _cut(redact_patterns(str((meta.get("annotations") or {}).get(CHANGE_CAUSE) or "")), MESSAGE_MAX_CHARS) or None,
            "replicas": (rs.get("spec") or {}).get("replicas", 0),
            "ready_replicas": status.get("readyReplicas") or 0,
            "current": index == 0,
        })
    facts = facts[:limit]
    diff = None
    if len(owned) > 1:
        new, old = owned[0], owned[1]
        diff = {
            "id": f"diff/{_revision(old)}-{_revision(new)}",
            "from": _revision(old), "to": _revision(new),
            "changes": template_diff((old.get("spec") or {}).get("template") or {}, (new.get("spec") or {}).get("template") or {}),
        }
    return facts, diff


# --------------------------------------------------------------------------- configuration


def config_refs(template_spec: dict) -> tuple[list[str], list[str]]:
    """(ConfigMaps, Secrets) a pod spec mounts or reads, sorted."""
    maps, secrets = set(), set()
    for volume in template_spec.get("volumes") or []:
        if (volume.get("configMap") or {}).get("name"):
            maps.add(volume["configMap"]["name"])
        if (volume.get("secret") or {}).get("secretName"):
            secrets.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if (source.get("configMap") or {}).get("name"):
                maps.add(source["configMap"]["name"])
            if (source.get("secret") or {}).get("name"):
                secrets.add(source["secret"]["name"])
    for container in (template_spec.get("containers") or []) + (template_spec.get("initContainers") or []):
        for source in container.get("envFrom") or []:
            if (source.get("configMapRef") or {}).get("name"):
                maps.add(source["configMapRef"]["name"])
            if (source.get("secretRef") or {}).get("name"):
                secrets.add(source["secretRef"]["name"])
        for env in container.get("env") or []:
            ref = env.get("valueFrom") or {}
            if (ref.get("configMapKeyRef") or {}).get("name"):
                maps.add(ref["configMapKeyRef"]["name"])
            if (ref.get("secretKeyRef") or {}).get("name"):
                secrets.add(ref["secretKeyRef"]["name"])
    return sorted(maps), sorted(secrets)


def configmap_fact(name: str, metadata: dict | None, window: Window, error: str | None = None) -> dict:
    fact = {"id": f"configmap/{name}", "kind": "ConfigMap", "name": name}
    if error:
        return {**fact, "error": error, "changed_at": None, "in_window": False}
    meta = (metadata or {}).get("metadata") or {}
    # The last write is the newest managedFields entry; creation otherwise.
    times = [parse_time(meta.get("creationTimestamp"))] + [parse_time(m.get("time")) for m in meta.get("managedFields") or []]
    changed = max((t for t in times if t), default=None)
    return {**fact, "changed_at": iso(changed), "in_window": window.holds(changed) and changed <= window.onset}


def secret_fact(name: str) -> dict:
    # Secrets are never read (not even their metadata: RBAC grants no verb on
    # them), so only the name is known.
    return {"id": f"secret/{name}", "kind": "Secret", "name": name, "changed_at": None, "in_window": False}


def hpa_fact(hpa: dict) -> dict:
    meta, spec, status = hpa.get("metadata") or {}, hpa.get("spec") or {}, hpa.get("status") or {}
    return {
        "id": f"hpa/{meta.get('name')}", "name": meta.get("name"),
        "min": spec.get("minReplicas"), "max": spec.get("maxReplicas"),
        "current": status.get("currentReplicas"), "desired": status.get("desiredReplicas"),
        "last_scale": status.get("lastScaleTime"),
    }


# --------------------------------------------------------------------------- nodes


def node_fact(node: dict) -> dict:
    conditions = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
    name = (node.get("metadata") or {}).get("name")
    return {
        "id": f"node/{name}", "name": name,
        "conditions": {t: conditions[t] for t in NODE_CONDITIONS if t in conditions},
        "not_ready": conditions.get("Ready", "True") != "True",
        "pressure": [t for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable") if conditions.get(t) == "True"],
        "unschedulable": bool((node.get("spec") or {}).get("unschedulable")),
    }
