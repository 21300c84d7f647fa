"""Labelled diagnosis cases: tests/fixtures/diagnosis/*.yaml, each a small
cluster state written compactly and built here into the Kubernetes objects
the loopback API server serves (Deployment, ReplicaSets with revisions,
pods with container statuses, Events, nodes, ConfigMaps, HPAs, logs) and the
Prometheus series the real binary scrapes.

Each case gets its own namespace (``dx-<file stem>``), so the Prometheus
series of every case can be exposed at once and queries stay apart.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "diagnosis"
PROBES = FIXTURES / "probes.yaml"


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    spec: dict

    @property
    def namespace(self) -> str:
        return f"dx-{self.name}"[:63]

    def incident(self) -> dict:
        alert = self.spec["alert"]
        labels = {"namespace": self.namespace, **{k: v for k, v in alert.items() if k not in ("alertname", "starts_at")}}
        return {"id": f"case-{self.name}", "alert_name": alert["alertname"], "labels": labels, "starts_at": alert["starts_at"]}


def load_cases() -> list[Case]:
    cases = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        if path.name == "probes.yaml":
            continue
        spec = yaml.safe_load(path.read_text())
        cases.append(Case(path.stem, spec["expected"], spec))
    return cases


def _hash(deployment: str, revision: int) -> str:
    return hashlib.sha1(f"{deployment}/{revision}".encode()).hexdigest()[:10]


def _container(spec: dict) -> dict:
    container = {"name": spec.get("name", "app"), "image": spec["image"]}
    if spec.get("env"):
        container["env"] = [{"name": k, "value": str(v)} for k, v in sorted(spec["env"].items())]
    resources = {}
    for kind in ("limits", "requests"):
        if spec.get(kind):
            resources[kind] = dict(spec[kind])
    if resources:
        container["resources"] = resources
    for probe in ("livenessProbe", "readinessProbe"):
        if spec.get(probe):
            container[probe] = {"httpGet": {"path": spec[probe], "port": 8080}, "periodSeconds": 10}
    if spec.get("command"):
        container["command"] = list(spec["command"])
    if spec.get("envFrom"):
        container["envFrom"] = [{"configMapRef": {"name": n}} for n in spec["envFrom"]]
    return container


def _template(deployment: dict, revision: dict, labels: dict, pod_hash: str | None) -> dict:
    containers = revision.get("containers") or deployment["containers"]
    volumes = [{"name": f"cm-{n}", "configMap": {"name": n}} for n in deployment.get("configmaps", [])]
    volumes += [{"name": f"secret-{n}", "secret": {"secretName": n}} for n in deployment.get("secrets", [])]
    template_labels = {**labels, **({"pod-template-hash": pod_hash} if pod_hash else {})}
    spec = {"containers": [_container(c) for c in containers]}
    if volumes:
        spec["volumes"] = volumes
    return {"metadata": {"labels": template_labels}, "spec": spec}


def _state(raw) -> dict:
    """``running`` | ``{waiting: Reason}`` | ``{terminated: Reason, exit: n}``."""
    if raw in (None, "running"):
        return {"running": {"startedAt": "2026-11-27T09:00:00Z"}}
    if "waiting" in raw:
        return {"waiting": {"reason": raw["waiting"], **({"message": raw["message"]} if raw.get("message") else {})}}
    return {"terminated": {"reason": raw["terminated"], "exitCode": raw.get("exit", 1),
                           "finishedAt": raw.get("at", "2026-11-27T09:58:00Z")}}


def build(case: Case) -> tuple[list[dict], dict[tuple[str, str, bool], str], list[str]]:
    """(Kubernetes objects, logs by (pod, container, previous), Prometheus exposition lines)."""
    spec, ns = case.spec, case.namespace
    objects: list[dict] = []
    d = spec.get("deployment")
    hashes: dict[int, str] = {}
    if d:
        labels = {"app": d["name"]}
        revisions = spec.get("revisions") or [{"revision": 1, "created": "2026-11-01T09:00:00Z"}]
        current = revisions[-1]
        for rev in revisions:
            hashes[rev["revision"]] = _hash(d["name"], rev["revision"])
            annotations = {"deployment.kubernetes.io/revision": str(rev["revision"])}
            if rev.get("change_cause"):
                annotations["kubernetes.io/change-cause"] = rev["change_cause"]
            is_current = rev is current
            replicas = d["replicas"] if is_current else 0
            objects.append({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": f"{d['name']}-{hashes[rev['revision']]}", "namespace": ns,
                             "labels": {**labels, "pod-template-hash": hashes[rev["revision"]]},
                             "annotations": annotations, "creationTimestamp": rev["created"],
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": d["name"], "controller": True}]},
                "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                         "template": _template(d, rev, labels, hashes[rev["revision"]])},
                "status": {"replicas": replicas, "readyReplicas": rev.get("ready", replicas)},
            })
        template = _template(d, current, labels, None)
        ready = sum(1 for p in spec.get("pods", []) if p.get("ready", True) and not p.get("evicted"))
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": d["name"], "namespace": ns, "labels": labels, "generation": len(revisions),
                         "annotations": {"deployment.kubernetes.io/revision": str(current["revision"])}},
            "spec": {"replicas": d["replicas"], "selector": {"matchLabels": labels}, "template": template},
            "status": {"replicas": d["replicas"], "readyReplicas": ready, "availableReplicas": ready,
                       "updatedReplicas": d["replicas"], "observedGeneration": len(revisions)},
        })
        current_rev = current["revision"]
    else:
        labels, current_rev = {}, None
    for p in spec.get("pods", []):
        revision = p.get("revision", current_rev)
        pod_labels = {**labels, **({"pod-template-hash": hashes[revision]} if revision in hashes else {})}
        containers = p.get("containers") or [{"name": "app", **{k: p[k] for k in ("ready", "restarts", "state", "last") if k in p}}]
        images = {c.get("name", "app"): c["image"] for c in (next((r for r in spec.get("revisions", []) if r["revision"] == revision), {}).get("containers") or (d or {}).get("containers") or [{"name": "app", "image": "registry.local/app:1"}])}
        statuses = []
        for c in containers:
            name = c.get("name", "app")
            statuses.append({
                "name": name, "ready": c.get("ready", True), "restartCount": c.get("restarts", 0),
                "image": p.get("image", images.get(name, "registry.local/app:1")), "imageID": "",
                "state": _state(c.get("state")),
                "lastState": {"terminated": {"reason": c["last"]["terminated"], "exitCode": c["last"].get("exit", 1),
                                             "finishedAt": c["last"].get("at", "2026-11-27T09:58:00Z")}} if c.get("last") else {},
            })
        status = {"phase": p.get("phase", "Running"), "containerStatuses": statuses}
        if p.get("evicted"):
            status.update(phase="Failed", reason="Evicted", message=p["evicted"], containerStatuses=[])
        if p.get("unschedulable"):
            status.update(phase="Pending", containerStatuses=[],
                          conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": p["unschedulable"]}])
        owner = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{d['name']}-{hashes[revision]}", "controller": True}] if revision in hashes else []
        objects.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p["name"], "namespace": ns, "labels": pod_labels, "ownerReferences": owner,
                         "creationTimestamp": p.get("created", "2026-11-27T08:00:00Z"), "uid": f"uid-{p['name']}"},
            "spec": {"nodeName": None if p.get("unschedulable") else p.get("node", "node-a"),
                     "containers": [{"name": c.get("name", "app"), "image": images.get(c.get("name", "app"), "registry.local/app:1")} for c in containers],
                     **({"volumes": _template(d, {}, labels, None)["spec"].get("volumes", [])} if d else {})},
            "status": status,
        })
    for i, e in enumerate(spec.get("events", [])):
        kind, name = e["object"].split("/", 1)
        objects.append({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{i:04x}{hashlib.sha1(e['reason'].encode()).hexdigest()[:8]}",
                         "namespace": "default" if kind == "Node" else ns},
            "involvedObject": {"kind": kind, "name": name, **({} if kind == "Node" else {"namespace": ns})},
            "type": e.get("type", "Warning"), "reason": e["reason"], "message": e.get("message", ""),
            "count": e.get("count", 1), "firstTimestamp": e.get("first", e.get("last", "2026-11-27T09:55:00Z")),
            "lastTimestamp": e.get("last", "2026-11-27T09:59:00Z"),
        })
    for n in spec.get("nodes", [{"name": "node-a"}]):
        conditions = {"Ready": "True", "MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False",
                      **(n.get("conditions") or {})}
        objects.append({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": n["name"], "labels": {}}, "spec": {},
            "status": {"conditions": [{"type": t, "status": v, "lastTransitionTime": "2026-11-27T09:00:00Z"}
                                      for t, v in sorted(conditions.items())]},
        })
    for c in spec.get("configmaps", []):
        objects.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": c["name"], "namespace": ns, "creationTimestamp": c.get("created", "2026-10-01T00:00:00Z"),
                         "managedFields": [{"manager": "kubectl", "operation": "Update", "time": c["changed"]}] if c.get("changed") else []},
            "data": {"settings": "value-never-read"},
        })
    for h in spec.get("hpas", []):
        objects.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": h["name"], "namespace": ns},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": h.get("target", (d or {}).get("name"))},
                     "minReplicas": h.get("min", 2), "maxReplicas": h.get("max", 10)},
            "status": {"currentReplicas": h.get("current", 2), "desiredReplicas": h.get("desired", 2),
                       **({"lastScaleTime": h["last_scale"]} if h.get("last_scale") else {})},
        })
    logs = {(entry["pod"], entry.get("container", "app"), bool(entry.get("previous"))): entry["text"] for entry in spec.get("logs", [])}
    return objects, logs, series(case)


def series(case: Case) -> list[str]:
    spec, ns = case.spec, case.namespace
    lines = []
    for dependency, state in sorted((spec.get("dependencies") or {}).items()):
        lines.append(f'dependency_up{{namespace="{ns}",dependency="{dependency}"}} {1 if state == "up" else 0}')
    for pod, values in sorted((spec.get("saturation") or {}).items()):
        labels = f'namespace="{ns}",pod="{pod}",container="app"'
        if "cpu_throttling" in values:
            lines.append(f"container_cpu_cfs_periods_total{{{labels}}} +100")
            lines.append(f"container_cpu_cfs_throttled_periods_total{{{labels}}} +{round(values['cpu_throttling'] * 100)}")
        if "memory" in values:
            used, limit = values["memory"]
            lines.append(f"container_memory_working_set_bytes{{{labels}}} {used}")
            lines.append(f'kube_pod_container_resource_limits{{{labels},resource="memory",unit="byte"}} {limit}')
    return lines


def load_into(kube, case: Case) -> None:
    """Replace what the loopback API server holds with this case."""
    kube.clear()
    objects, logs, _ = build(case)
    for obj in objects:
        kube.add(copy.deepcopy(obj))
    for (pod, container, previous), text in logs.items():
        kube.add_log(case.namespace, pod, container, text, previous)
