"""A loopback Kubernetes API server: the real paths, realistic objects, and
every request recorded, for the official client configured by a kubeconfig."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from loopback.servers import Recorded, RecordingServer


def pod(name, labels, phase="Running", ready=True, restarts=0, waiting=None, terminated=None, node="node-1", reason=None, namespace="production",
        owner=None):
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {"startedAt": "2026-11-27T10:00:00Z"}}
    last = {"terminated": {"reason": terminated, "exitCode": 137}} if terminated else {}
    status = {
        "phase": phase,
        "containerStatuses": [{
            "name": "app", "ready": ready, "restartCount": restarts, "image": "registry.local/app:1",
            "imageID": "sha256:0", "state": state, "lastState": last,
        }],
    }
    if reason:
        status["reason"] = reason
    metadata = {"name": name, "namespace": namespace, "labels": labels, "uid": f"uid-{name}"}
    if owner:
        metadata["ownerReferences"] = [_owner_ref(*owner)]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.local/app:1"}]},
        "status": status,
    }


def deployment(name, replicas, ready=None, namespace="production", labels=None):
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "generation": 1, "uid": f"uid-{name}"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels, "annotations": {}}, "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]}},
        },
        "status": {"replicas": replicas, "readyReplicas": replicas if ready is None else ready,
                   "availableReplicas": replicas if ready is None else ready, "updatedReplicas": replicas, "observedGeneration": 1},
    }


def _owner_ref(kind, name):
    api = "v1" if kind in ("Node",) else "apps/v1"
    return {"apiVersion": api, "kind": kind, "name": name, "uid": f"uid-{name}", "controller": True, "blockOwnerDeletion": True}


def replicaset(name, deployment, namespace="production", labels=None):
    """A ReplicaSet a Deployment owns (pods name it as their owner)."""
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}, "uid": f"uid-{name}",
                     "ownerReferences": [_owner_ref("Deployment", deployment)]},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels or {}}},
        "status": {"replicas": 1},
    }


def statefulset(name, replicas, namespace="production", labels=None):
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "uid": f"uid-{name}"},
        "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]}}},
        "status": {"replicas": replicas},
    }


def _status(code, reason, message):
    return code, {"Content-Type": "application/json"}, json.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}
    ).encode()


class FakeKubernetes:
    def __init__(self):
        self.deployments: dict[tuple[str, str], dict] = {}
        self.pods: list[dict] = []
        self.nodes: dict[str, dict] = {}
        self.jobs: list[dict] = []
        self.replicasets: dict[tuple[str, str], dict] = {}
        self.statefulsets: dict[tuple[str, str], dict] = {}
        self.failures: list[tuple[str, str, int | str]] = []  # (method, path regex, status or "hang")
        self.rollout_delay = 0.0  # seconds before a scaled deployment reports ready
        self.server = RecordingServer(self._respond)

    @property
    def requests(self) -> list[Recorded]:
        return self.server.requests

    def start(self) -> "FakeKubernetes":
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.server.url}'}}}}]\n"
            "users: [{name: incident-response, user: {token: fake-service-account-token}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: incident-response}}]\n"
            "current-context: fake\n"
        )
        return path

    def add_deployment(self, obj):
        self.deployments[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def add_replicaset(self, obj):
        self.replicasets[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def add_statefulset(self, obj):
        self.statefulsets[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def add_node(self, name):
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {}}, "spec": {}, "status": {}}

    def fail(self, method: str, path_regex: str, status: int | str):
        self.failures.append((method, path_regex, status))

    def calls(self, method=None, contains=""):
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def _respond(self, req: Recorded):
        url = urlsplit(req.path)
        path, query = url.path, parse_qs(url.query)
        for method, pattern, status in self.failures:
            if method == req.method and re.search(pattern, path):
                if status == "hang":
                    time.sleep(30)
                    return _status(504, "Timeout", "hung")
                return _status(status, {403: "Forbidden", 409: "Conflict", 404: "NotFound"}.get(status, "InternalError"), f"injected {status}")
        body = json.loads(req.body) if req.body else None
        if req.method == "PATCH" and req.headers.get("content-type") == "application/json-patch+json" and not isinstance(body, list):
            # What a real API server says to a merge-style body sent as a JSON patch.
            return _status(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)(/scale)?", path)
        if m:
            return self._deployment(req.method, m.group(1), m.group(2), bool(m.group(3)), body)
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/(replicasets|statefulsets)/([^/]+)", path)
        if m and req.method == "GET":
            store = self.replicasets if m.group(2) == "replicasets" else self.statefulsets
            obj = store.get((m.group(1), m.group(3)))
            if obj is None:
                return _status(404, "NotFound", f'{m.group(2)}.apps "{m.group(3)}" not found')
            return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?", path)
        if m:
            return self._pods(req.method, m.group(1), m.group(2), query)
        m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs", path)
        if m and req.method == "POST":
            job = copy.deepcopy(body)
            job.setdefault("metadata", {})["namespace"] = m.group(1)
            job["metadata"].setdefault("name", job["metadata"].get("generateName", "job-") + str(len(self.jobs)))
            self.jobs.append(job)
            return 201, {"Content-Type": "application/json"}, json.dumps(job).encode()
        m = re.fullmatch(r"/api/v1/nodes/([^/]+)", path)
        if m and m.group(1) in self.nodes:
            node = self.nodes[m.group(1)]
            if req.method == "PATCH":
                node["spec"].update((body or {}).get("spec", {}))
            return 200, {"Content-Type": "application/json"}, json.dumps(node).encode()
        return _status(404, "NotFound", f"{path} not found")

    def _deployment(self, method, ns, name, scale, body):
        obj = self.deployments.get((ns, name))
        if obj is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        if method == "PATCH" and scale:
            replicas = body["spec"]["replicas"]
            obj["spec"]["replicas"] = replicas
            obj["status"]["replicas"] = replicas
            if self.rollout_delay:
                obj["_ready_at"] = time.monotonic() + self.rollout_delay
            else:
                obj["status"]["readyReplicas"] = obj["status"]["availableReplicas"] = replicas
        elif method == "PATCH":
            annotations = (body or {}).get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
            obj["spec"]["template"]["metadata"].setdefault("annotations", {}).update(annotations)
            obj["metadata"]["generation"] += 1
            obj["status"]["observedGeneration"] = obj["metadata"]["generation"]
            # The restarted pods come up healthy (after rollout_delay).
            obj["status"]["updatedReplicas"] = obj["spec"]["replicas"]
            if self.rollout_delay:
                obj["_ready_at"] = time.monotonic() + self.rollout_delay
            else:
                obj["status"]["readyReplicas"] = obj["status"]["availableReplicas"] = obj["spec"]["replicas"]
        if obj.get("_ready_at") and time.monotonic() >= obj["_ready_at"]:
            obj["status"]["readyReplicas"] = obj["status"]["availableReplicas"] = obj["spec"]["replicas"]
            obj.pop("_ready_at")
        public = {k: v for k, v in obj.items() if not k.startswith("_")}
        if scale:
            public = {
                "apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": obj["spec"]["replicas"]},
                "status": {"replicas": obj["status"]["replicas"]},
            }
        return 200, {"Content-Type": "application/json"}, json.dumps(public).encode()

    def _pods(self, method, ns, name, query):
        if name:
            for p in self.pods:
                if p["metadata"]["namespace"] == ns and p["metadata"]["name"] == name:
                    if method == "DELETE":
                        self.pods.remove(p)
                    return 200, {"Content-Type": "application/json"}, json.dumps(p).encode()
            return _status(404, "NotFound", f'pods "{name}" not found')
        selector = dict(part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if "=" in part)
        items = [p for p in self.pods if p["metadata"]["namespace"] == ns and all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        return 200, {"Content-Type": "application/json"}, json.dumps({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}).encode()
