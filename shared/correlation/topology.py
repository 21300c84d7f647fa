"""Where a pod runs and which workload owns it: from the Kubernetes API
(:class:`Topology`) and/or from kube-state-metrics series in Prometheus
(:class:`KubeStateMetrics`), the first answering of :class:`Sources`.

Read-only, every call bounded by a timeout, every answer cached briefly: a
storm of a node's pods asks about each pod once (the API) or about each
namespace once (Prometheus). A failed call makes that alert fall back to
label rules; it never fails the intake. Called before the intake's
transaction; inside one (the sweep's replays) only what is cached is read
(``fetch=False``), so no network call ever holds a transaction open.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("correlation")

CACHE_SECONDS = 30.0
FAILURE_CACHE_SECONDS = 5.0
TIMEOUT_SECONDS = 2.0
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


@dataclass(frozen=True)
class Placement:
    node: str | None
    workload: tuple[str, str] | None  # (kind, name), the top of the pod's owner chain


def _config_present() -> bool:
    """What shared.kube would find: the in-cluster account or a kubeconfig."""
    path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or Path(path).exists()


class Topology:
    def __init__(self, client_factory: Callable[[], object | None], timeout: float = TIMEOUT_SECONDS,
                 ttl: float = CACHE_SECONDS, configured: Callable[[], bool] | None = None):
        self._factory = client_factory
        self._configured = configured or _config_present
        self.timeout = timeout
        self.ttl = ttl
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._lock = threading.Lock()
        self._apis = None

    def _api(self):
        if self._apis is None:
            client = self._factory()
            if client is None:
                return None
            from kubernetes import client as k8s

            self._apis = (k8s.CoreV1Api(client), k8s.AppsV1Api(client))
        return self._apis

    @property
    def available(self) -> bool:
        return self._api() is not None

    def configured(self) -> bool:
        """Whether a Kubernetes configuration exists, without importing the
        client (its import costs a cold start ~0.4 s; the first lookup pays it)."""
        return self._configured()

    def _cached(self, key: tuple, fetch: Callable[[], object], lookup: bool = True):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        if not lookup:
            return None
        try:
            value, ttl = fetch(), self.ttl
        except Exception as exc:  # noqa: BLE001 - topology is best effort; label rules still apply
            status = getattr(exc, "status", None)
            value, ttl = None, (self.ttl if status == 404 else FAILURE_CACHE_SECONDS)
            if status != 404:
                log.warning("Kubernetes topology lookup failed", extra={"lookup": "/".join(key), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        with self._lock:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = (now + ttl, value)
        return value

    def _owner(self, meta) -> tuple[str, str] | None:
        for ref in meta.owner_references or []:
            if ref.controller or len(meta.owner_references) == 1:
                return ref.kind, ref.name
        return None

    def placement(self, namespace: str, pod: str, fetch: bool = True) -> Placement | None:
        apis = self._api()
        if apis is None:
            return None
        core, apps = apis

        def read():
            obj = core.read_namespaced_pod(pod, namespace, _request_timeout=self.timeout)
            owner = self._owner(obj.metadata)
            if owner and owner[0] == "ReplicaSet":
                rs = self._cached(("rs", namespace, owner[1]),
                                  lambda: apps.read_namespaced_replica_set(owner[1], namespace, _request_timeout=self.timeout))
                owner = self._owner(rs.metadata) if rs is not None else None
            workload = owner if owner and owner[0] in WORKLOAD_KINDS else None
            return Placement(obj.spec.node_name if obj.spec else None, workload)

        return self._cached(("pod", namespace, pod), read, fetch)

    def workload_nodes(self, namespace: str, kind: str, name: str, fetch: bool = True) -> set[str]:
        """The nodes the workload's pods run on (its selector's pods)."""
        apis = self._api()
        if apis is None:
            return set()
        core, apps = apis
        readers = {"Deployment": apps.read_namespaced_deployment, "StatefulSet": apps.read_namespaced_stateful_set,
                   "DaemonSet": apps.read_namespaced_daemon_set}

        def read():
            obj = readers[kind](name, namespace, _request_timeout=self.timeout)
            selector = (obj.spec.selector.match_labels or {}) if obj.spec and obj.spec.selector else {}
            if not selector:
                return frozenset()
            pods = core.list_namespaced_pod(namespace, label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items())),
                                            _request_timeout=self.timeout)
            return frozenset(p.spec.node_name for p in pods.items if p.spec and p.spec.node_name)

        return set(self._cached(("workload", namespace, kind, name), read, fetch) or ())


# kube-state-metrics: pod -> node and pod -> owner, ReplicaSet -> Deployment.
KSM_SERIES = ("kube_pod_info", "kube_pod_owner", "kube_replicaset_owner")


class KubeStateMetrics:
    """The same answers from kube-state-metrics series in Prometheus
    (``PROMETHEUS_URL``, as diagnostics reads it): ``kube_pod_info`` (the
    pod's node), ``kube_pod_owner`` (ReplicaSet, StatefulSet or DaemonSet)
    and ``kube_replicaset_owner`` (ReplicaSet -> Deployment). One instant
    query per namespace fetches all three for every pod of it, cached like
    the API's answers, so a storm of one namespace's pods costs one query."""

    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS, ttl: float = CACHE_SECONDS):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.ttl = ttl
        self._cache: dict[str, tuple[float, dict | None]] = {}
        self._lock = threading.Lock()

    available = True

    def configured(self) -> bool:
        return bool(self.url)

    def _query(self, namespace: str) -> list[dict]:
        from shared import promapi
        from shared.templating import promql_string

        # A scrape without honor_labels renames kube-state-metrics' own
        # namespace and pod labels to exported_*: ask for both spellings.
        series, ns = "|".join(KSM_SERIES), promql_string(namespace)
        promql = f'{{__name__=~"{series}",namespace="{ns}"}} or {{__name__=~"{series}",exported_namespace="{ns}"}}'
        return [own_labels(found.get("metric") or {}) for found in promapi.instant(self.url, promql, self.timeout)
                if isinstance(found, dict)]

    def _namespace(self, namespace: str, fetch: bool) -> dict | None:
        """pod -> Placement for every pod kube-state-metrics knows in it."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(namespace)
            if hit and hit[0] > now:
                return hit[1]
        if not fetch:
            return None
        try:
            value, ttl = _placements([m for m in self._query(namespace) if m.get("namespace") == namespace]), self.ttl
        except Exception as exc:  # noqa: BLE001 - topology is best effort; label rules still apply
            value, ttl = None, FAILURE_CACHE_SECONDS
            log.warning("kube-state-metrics topology lookup failed",
                        extra={"lookup": namespace, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        with self._lock:
            if len(self._cache) > 5_000:
                self._cache.clear()
            self._cache[namespace] = (now + ttl, value)
        return value

    def placement(self, namespace: str, pod: str, fetch: bool = True) -> Placement | None:
        return (self._namespace(namespace, fetch) or {}).get(pod)

    def workload_nodes(self, namespace: str, kind: str, name: str, fetch: bool = True) -> set[str]:
        pods = self._namespace(namespace, fetch) or {}
        return {p.node for p in pods.values() if p.workload == (kind, name) and p.node}


def own_labels(metric: dict) -> dict:
    """kube-state-metrics' labels as it wrote them: where the scrape kept
    the target's ``namespace``/``pod`` and renamed its own ``exported_*``
    (no honor_labels), the exported one is the object's."""
    labels = dict(metric)
    for key, value in metric.items():
        if key.startswith("exported_") and value:
            labels[key[len("exported_"):]] = value
    return labels


def _placements(series: list[dict]) -> dict[str, Placement]:
    nodes: dict[str, str] = {}
    owners: dict[str, tuple[str, str]] = {}
    replicasets: dict[str, tuple[str, str]] = {}
    for labels in series:
        name = labels.get("__name__")
        if name == "kube_pod_info" and labels.get("pod") and labels.get("node"):
            nodes[labels["pod"]] = labels["node"]
        elif name == "kube_pod_owner" and labels.get("pod") and labels.get("owner_kind") not in (None, "", "<none>"):
            # The controller's reference wins over any other owner.
            if labels.get("owner_is_controller") == "true" or labels["pod"] not in owners:
                owners[labels["pod"]] = (labels["owner_kind"], labels.get("owner_name", ""))
        elif name == "kube_replicaset_owner" and labels.get("replicaset") and labels.get("owner_kind") not in (None, "", "<none>"):
            if labels.get("owner_is_controller") == "true" or labels["replicaset"] not in replicasets:
                replicasets[labels["replicaset"]] = (labels["owner_kind"], labels.get("owner_name", ""))
    placements = {}
    for pod in set(nodes) | set(owners):
        owner = owners.get(pod)
        if owner and owner[0] == "ReplicaSet":
            owner = replicasets.get(owner[1])
        workload = owner if owner and owner[0] in WORKLOAD_KINDS and owner[1] else None
        placements[pod] = Placement(nodes.get(pod), workload)
    return placements


class Sources:
    """The topology sources in order: the Kubernetes API when a
    configuration exists, then kube-state-metrics when ``PROMETHEUS_URL`` is
    set. A pod the first cannot place (a failed call, or a pod already
    deleted, as a lost node's pods soon are) is asked of the next."""

    def __init__(self, sources: list):
        self.sources = sources
        self._usable: list | None = None

    def configured(self) -> bool:
        return any(s.configured() for s in self.sources)

    def names(self) -> list[str]:
        return [type(s).__name__ for s in self.sources if s.configured()]

    def usable(self) -> list:
        if self._usable is None:
            self._usable = [s for s in self.sources if s.configured() and s.available]
        return self._usable

    @property
    def available(self) -> bool:
        return bool(self.usable())

    def placement(self, namespace: str, pod: str, fetch: bool = True) -> Placement | None:
        for source in self.usable():
            found = source.placement(namespace, pod, fetch)
            if found is not None and (found.node or found.workload):
                return found
        return None

    def workload_nodes(self, namespace: str, kind: str, name: str, fetch: bool = True) -> set[str]:
        for source in self.usable():
            nodes = source.workload_nodes(namespace, kind, name, fetch)
            if nodes:
                return nodes
        return set()


def from_settings(config, kube_client_factory: Callable[[], object | None]) -> Sources:
    """What the intake reads topology from (docs/correlation.md)."""
    timeout = config.correlation_topology_timeout_seconds
    sources: list = [Topology(kube_client_factory, timeout=timeout)]
    if config.prometheus_url:
        sources.append(KubeStateMetrics(config.prometheus_url, timeout=timeout))
    return Sources(sources)
