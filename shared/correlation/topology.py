"""Where a pod runs and which workload owns it, from the Kubernetes API.

Read-only (get pods, replicasets, deployments, statefulsets, daemonsets;
list pods), every call bounded by a timeout, every answer cached briefly:
a storm of a node's pods asks about each pod once, and a workload once.
A failed call makes that alert fall back to label rules; it never fails the
intake. Called before the intake's transaction, never inside it.
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

    def _cached(self, key: tuple, fetch: Callable[[], object]):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
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

    def placement(self, namespace: str, pod: str) -> Placement | None:
        apis = self._api()
        if apis is None:
            return None
        core, apps = apis

        def fetch():
            obj = core.read_namespaced_pod(pod, namespace, _request_timeout=self.timeout)
            owner = self._owner(obj.metadata)
            if owner and owner[0] == "ReplicaSet":
                rs = self._cached(("rs", namespace, owner[1]),
                                  lambda: apps.read_namespaced_replica_set(owner[1], namespace, _request_timeout=self.timeout))
                owner = self._owner(rs.metadata) if rs is not None else None
            workload = owner if owner and owner[0] in WORKLOAD_KINDS else None
            return Placement(obj.spec.node_name if obj.spec else None, workload)

        return self._cached(("pod", namespace, pod), fetch)

    def workload_nodes(self, namespace: str, kind: str, name: str) -> set[str]:
        """The nodes the workload's pods run on (its selector's pods)."""
        apis = self._api()
        if apis is None:
            return set()
        core, apps = apis
        readers = {"Deployment": apps.read_namespaced_deployment, "StatefulSet": apps.read_namespaced_stateful_set,
                   "DaemonSet": apps.read_namespaced_daemon_set}

        def fetch():
            obj = readers[kind](name, namespace, _request_timeout=self.timeout)
            selector = (obj.spec.selector.match_labels or {}) if obj.spec and obj.spec.selector else {}
            if not selector:
                return frozenset()
            pods = core.list_namespaced_pod(namespace, label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items())),
                                            _request_timeout=self.timeout)
            return frozenset(p.spec.node_name for p in pods.items if p.spec and p.spec.node_name)

        return set(self._cached(("workload", namespace, kind, name), fetch) or ())
