"""A loopback Kubernetes API server: the real paths, realistic objects, and
every request recorded, for the official client configured by a kubeconfig."""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from contextlib import contextmanager
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


def _json(code, obj):
    return code, {"Content-Type": "application/json"}, json.dumps(obj).encode()


REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"


def replicaset(owner, revision, image, pod_hash=None, replicas=0, annotations=None, created="2026-11-27T10:00:00Z"):
    """A ReplicaSet the deployment controller made for one revision of
    ``owner``'s pod template, with the ``image`` its containers ran."""
    meta = owner["metadata"]
    pod_hash = pod_hash or f"h{revision:04d}"
    template = copy.deepcopy(owner["spec"]["template"])
    template["metadata"]["labels"] = {**template["metadata"].get("labels", {}), HASH_LABEL: pod_hash}
    for container in template["spec"]["containers"]:
        container["image"] = image
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": f"{meta['name']}-{pod_hash}", "namespace": meta["namespace"], "uid": f"uid-rs-{meta['name']}-{pod_hash}",
            "creationTimestamp": created,
            "labels": {**owner["spec"]["selector"]["matchLabels"], HASH_LABEL: pod_hash},
            "annotations": {REVISION: str(revision), **(annotations or {})},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"], "uid": meta["uid"], "controller": True}],
        },
        "spec": {"replicas": replicas, "selector": {"matchLabels": {**owner["spec"]["selector"]["matchLabels"], HASH_LABEL: pod_hash}},
                 "template": template},
        "status": {"replicas": replicas},
    }


def _owner_ref(kind, name):
    api = "v1" if kind in ("Node",) else "apps/v1"
    return {"apiVersion": api, "kind": kind, "name": name, "uid": f"uid-{name}", "controller": True, "blockOwnerDeletion": True}


def owned_replicaset(name, deployment, namespace="production", labels=None):
    """A ReplicaSet a Deployment owns (pods name it as their owner), for
    topology; ``replicaset`` makes one revision of a rollout history."""
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


def _without_hash(template):
    template = copy.deepcopy(template)
    template.get("metadata", {}).get("labels", {}).pop(HASH_LABEL, None)
    return template


def _status(code, reason, message):
    return code, {"Content-Type": "application/json"}, json.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}
    ).encode()


# Read-only kinds kept in one generic store: (API path prefix, plural, namespaced).
# Add a kind here and `add()` and GET/list (with label and field selectors)
# work for it.
READ_ONLY_KINDS = {
    "Event": ("/api/v1", "events", True),
    "ReplicaSet": ("/apis/apps/v1", "replicasets", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers", True),
}
_PLURALS = {(prefix, plural): kind for kind, (prefix, plural, _) in READ_ONLY_KINDS.items()}


def _field(obj: dict, dotted: str):
    value = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _label_term(labels: dict, term: str) -> bool:
    """One term of a label selector, equality- or set-based, as the API
    server reads it: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a)``, ``k`` (exists), ``!k`` (does not exist)."""
    sets = re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term)
    if sets:
        key, op, values = sets.group(1), sets.group(2), {v.strip() for v in sets.group(3).split(",")}
        return (key in labels and labels[key] in values) if op == "in" else labels.get(key) not in values
    equality = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", term)
    if equality:
        key, op, value = equality.groups()
        return (labels.get(key) == value) != (op == "!=")
    return term[1:].strip() not in labels if term.startswith("!") else term in labels


def _page(items: list, query: dict) -> tuple[list, dict]:
    """The page a list's ``limit`` and ``continue`` ask for, and the list's
    metadata: ``continue`` (here, the offset of the next page) while items
    are left, as an API server pages a list."""
    offset = int(query.get("continue", ["0"])[0] or 0)
    limit = int(query.get("limit", ["0"])[0] or 0)
    end = offset + limit if limit else len(items)
    more = end < len(items)
    return items[offset:end], ({"continue": str(end), "remainingItemCount": len(items) - end} if more else {})


def _selected(obj: dict, query: dict) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for part in filter(None, re.split(r",(?![^()]*\))", query.get("labelSelector", [""])[0])):
        if not _label_term(labels, part.strip()):
            return False
    for part in filter(None, query.get("fieldSelector", [""])[0].split(",")):
        key, _, value = part.partition("=")
        if _field(obj, key) != value:
            return False
    return True


def write_kubeconfig(server_url: str, directory: Path, proxy_url: str | None = None) -> Path:
    """A kubeconfig in ``directory`` for the API server at ``server_url``
    (reached through ``proxy_url`` when given), with a bearer token (what
    the service account's would be)."""
    path = directory / "kubeconfig"
    proxy = f", proxy-url: '{proxy_url}'" if proxy_url else ""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{server_url}'{proxy}}}}}]\n"
        "users: [{name: incident-response, user: {token: fake-service-account-token}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: incident-response}}]\n"
        "current-context: fake\n"
    )
    return path


@contextmanager
def cluster_at(server_url: str, directory: Path, server=None, proxy_url: str | None = None):
    """This process's Kubernetes client (shared.kube) talks to the API
    server at ``server_url`` (a FakeKubernetes, or a peer that misbehaves:
    loopback.trickle) until the block ends; KUBECONFIG is then as it was."""
    from shared import kube as kube_client

    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(write_kubeconfig(server_url, directory, proxy_url))
    kube_client.reset()
    try:
        yield server
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
        kube_client.reset()


class FakeKubernetes:
    def __init__(self):
        self.deployments: dict[tuple[str, str], dict] = {}
        self.pods: list[dict] = []
        self.nodes: dict[str, dict] = {}
        # kind -> {(namespace, name): object}, for READ_ONLY_KINDS
        self.objects: dict[str, dict[tuple[str, str], dict]] = {kind: {} for kind in READ_ONLY_KINDS}
        # (namespace, pod, container, previous) -> log text
        self.logs: dict[tuple[str, str, str, bool], str] = {}
        self.jobs: list[dict] = []
        self.replicasets: list[dict] = []
        self.statefulsets: dict[tuple[str, str], dict] = {}
        # (method, path regex, status, "hang", "trickle": a 200 whose body
        # comes a byte every 0.2 s, or "hold": answered normally once
        # ``released`` is set)
        self.failures: list[tuple[str, str, int | str]] = []
        self.released = threading.Event()
        self.rollout_delay = 0.0  # seconds before a scaled deployment reports ready
        self.deployment_changes: list = []  # reshape_deployments
        self.server = RecordingServer(self.respond)

    @property
    def requests(self) -> list[Recorded]:
        return self.server.requests

    def start(self) -> "FakeKubernetes":
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

    def kubeconfig(self, directory: Path) -> Path:
        return write_kubeconfig(self.server.url, directory)

    def as_cluster(self, directory: Path):
        """This process's Kubernetes client (shared.kube) talks to this
        server until the block ends; KUBECONFIG is then as it was."""
        return cluster_at(self.server.url, directory, self)

    def add_deployment(self, obj):
        self.deployments[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def add_node(self, name, conditions: dict[str, str] | None = None):
        """A node; ``conditions`` maps a type (Ready, DiskPressure...) to its status."""
        status = {"conditions": [{"type": t, "status": v, "reason": f"Kubelet{t}" if v == "True" else "", "message": "",
                                  "lastTransitionTime": "2026-11-27T09:00:00Z"}
                                 for t, v in sorted((conditions or {}).items())]}
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {}}, "spec": {}, "status": status}

    def add(self, obj: dict) -> dict:
        """Store any object: a Deployment, Pod or Node in its own table (they
        have write paths), any of READ_ONLY_KINDS in the generic store."""
        kind, meta = obj["kind"], obj.setdefault("metadata", {})
        if kind == "Deployment":
            self.add_deployment(obj)
        elif kind == "Pod":
            self.pods.append(obj)
        elif kind == "Node":
            self.nodes[meta["name"]] = obj
        elif kind == "ReplicaSet":
            self.replicasets.append(obj)
        else:
            self.objects[kind][(meta.get("namespace", ""), meta["name"])] = obj
        return obj

    def add_log(self, namespace: str, pod_name: str, container: str, text: str, previous: bool = False):
        self.logs[(namespace, pod_name, container, previous)] = text

    def clear(self):
        """Forget every object and log (failures and recorded requests too)."""
        self.deployments.clear(), self.pods.clear(), self.nodes.clear(), self.logs.clear()
        self.failures.clear(), self.requests.clear(), self.jobs.clear(), self.replicasets.clear(), self.statefulsets.clear()
        self.released.clear()
        for table in self.objects.values():
            table.clear()

    def add_replicaset(self, obj):
        self.replicasets.append(obj)

    def add_statefulset(self, obj):
        self.statefulsets[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def fail(self, method: str, path_regex: str, status: int | str):
        self.failures.append((method, path_regex, status))

    def calls(self, method=None, contains=""):
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def reshape_deployments(self, change) -> None:
        """``change(method, deployment)`` edits every Deployment the API
        answers with (not its scale subresource) before it is sent: a
        controller that lags behind a write, a server that omits a field."""
        self.deployment_changes.append(change)

    def respond(self, req: Recorded):
        """The API server's answer to one request (a test that needs the
        server to ignore a write wraps this as ``server.responder``)."""
        url = urlsplit(req.path)
        path, query = url.path, parse_qs(url.query)
        for method, pattern, status in self.failures:
            if method == req.method and re.search(pattern, path):
                if status == "hold":
                    self.released.wait(60)
                    break
                if status == "hang":
                    time.sleep(30)
                    return _status(504, "Timeout", "hung")
                if status == "trickle":
                    return 200, {"Content-Type": "application/json", "Content-Length": "100000"}, self._trickle
                return _status(status, {403: "Forbidden", 409: "Conflict", 404: "NotFound"}.get(status, "InternalError"), f"injected {status}")
        body = json.loads(req.body) if req.body else None
        if req.method == "PATCH" and req.headers.get("content-type") == "application/json-patch+json" and not isinstance(body, list):
            # What a real API server says to a merge-style body sent as a JSON patch.
            return _status(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        if req.method == "PATCH" and isinstance(body, list) and req.headers.get("content-type") != "application/json-patch+json":
            return _status(400, "BadRequest", "json: cannot unmarshal array into Go value of type map[string]interface {}")
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)(/scale)?", path)
        if m:
            answer = self._deployment(req.method, m.group(1), m.group(2), bool(m.group(3)), body)
            if m.group(3) or not self.deployment_changes or answer[0] >= 300:
                return answer
            obj = json.loads(answer[2])
            for change in self.deployment_changes:
                change(req.method, obj)
            return answer[0], answer[1], json.dumps(obj).encode()
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
        if m and req.method == "GET":
            return self._log(m.group(1), m.group(2), query)
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)", path)
        if m and req.method == "GET":
            obj = self.statefulsets.get((m.group(1), m.group(2)))
            if obj is None:
                return _status(404, "NotFound", f'statefulsets.apps "{m.group(2)}" not found')
            return _json(200, obj)
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?", path)
        if m:
            return self._pods(req.method, m.group(1), m.group(2), query)
        m = re.fullmatch(r"(/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/([^/]+))?/([a-z]+)(?:/([^/]+))?", path)
        if m and req.method == "GET" and (m.group(1), m.group(3)) in _PLURALS:
            return self._read(_PLURALS[(m.group(1), m.group(3))], m.group(2), m.group(4), query, req.headers.get("accept", ""))
        if path == "/api/v1/nodes" and req.method == "GET":
            items = [n for _, n in sorted(self.nodes.items()) if _selected(n, query)]
            return _json(200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items})
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

    def _trickle(self, out) -> None:
        """A body that never ends: a byte every 0.2 s, until the client
        goes, the server stops (a minute at most)."""
        for _ in range(300):
            try:
                out.write(b" ")
                out.flush()
            except OSError:
                return
            if self.released.wait(0.2):
                return

    def _read(self, kind, ns, name, query, accept):
        # ReplicaSets live in one list: rollbacks rewrite their revisions.
        table = ({(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in self.replicasets}
                 if kind == "ReplicaSet" else self.objects[kind])
        if name:
            obj = table.get((ns or "", name))
            if obj is None:
                return _status(404, "NotFound", f'{READ_ONLY_KINDS[kind][1]} "{name}" not found')
            if "as=PartialObjectMetadata" in accept:
                # What a metadata-only GET answers: never the data.
                return _json(200, {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
            return _json(200, obj)
        items = [o for (namespace, _), o in sorted(table.items()) if (ns is None or namespace == ns) and _selected(o, query)]
        items, metadata = _page(items, query)
        api_version = "v1" if READ_ONLY_KINDS[kind][0] == "/api/v1" else READ_ONLY_KINDS[kind][0][len("/apis/"):]
        return _json(200, {"apiVersion": api_version, "kind": f"{kind}List", "metadata": metadata, "items": items})

    def _log(self, ns, name, query):
        if not any(p["metadata"]["namespace"] == ns and p["metadata"]["name"] == name for p in self.pods):
            return _status(404, "NotFound", f'pods "{name}" not found')
        container = query.get("container", ["app"])[0]
        previous = query.get("previous", ["false"])[0] == "true"
        text = self.logs.get((ns, name, container, previous))
        if text is None:
            which = "previous terminated container" if previous else "container"
            return _status(400, "BadRequest", f'{which} "{container}" in pod "{name}" not found')
        lines = text.splitlines(keepends=True)
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"][0]):] if int(query["tailLines"][0]) else []
        body = "".join(lines).encode()
        if "limitBytes" in query:
            body = body[: int(query["limitBytes"][0])]
        return 200, {"Content-Type": "text/plain"}, body

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
        elif method == "PATCH" and isinstance(body, list):
            self._json_patch(obj, body)
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

    def _json_patch(self, obj, ops):
        """RFC 6902 ``replace`` (what `kubectl rollout undo` sends), then what
        the deployment controller does with a changed template: the
        ReplicaSet whose template matches becomes the newest revision."""
        for op in ops:
            assert op["op"] == "replace", op
            parts = op["path"].strip("/").split("/")
            target = obj
            for part in parts[:-1]:
                target = target[part]
            target[parts[-1]] = copy.deepcopy(op["value"])
        obj["metadata"]["generation"] += 1
        owned = [r for r in self.replicasets if any(o.get("uid") == obj["metadata"]["uid"] for o in r["metadata"].get("ownerReferences", []))]
        newest = max((int(r["metadata"]["annotations"].get(REVISION, 0)) for r in owned), default=0)
        for r in owned:
            if _without_hash(r["spec"]["template"]) == _without_hash(obj["spec"]["template"]):
                r["metadata"]["annotations"][REVISION] = str(newest + 1)
        obj["status"]["observedGeneration"] = obj["metadata"]["generation"]
        obj["status"]["updatedReplicas"] = obj["spec"]["replicas"]
        if self.rollout_delay:
            # The restored template's pods start from scratch.
            obj["status"]["readyReplicas"] = obj["status"]["availableReplicas"] = 0
            obj["_ready_at"] = time.monotonic() + self.rollout_delay
        else:
            obj["status"]["readyReplicas"] = obj["status"]["availableReplicas"] = obj["spec"]["replicas"]

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
        items, metadata = _page(items, query)
        return _json(200, {"apiVersion": "v1", "kind": "PodList", "metadata": metadata, "items": items})
