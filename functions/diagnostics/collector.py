"""Diagnostics of one incident: pods, metrics and dependencies, probed
concurrently, each probe bounded by its own timeout and all by a deadline.
A probe that fails is recorded as ``{"error": ...}`` and the rest still run."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from shared import kube
from shared.config import Settings
from shared.domain import service_of
from shared.templating import TemplateError, promql_string, render

log = logging.getLogger("diagnostics")

NOT_CONFIGURED = "not configured"
DEFAULT_PROBES_FILE = Path(__file__).with_name("probes.yaml")


class ProbeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """What the alert points at, resolved from its labels and probes.yaml."""

    service: str
    namespace: str
    deployment: str | None
    pod: str | None
    selector: str | None
    metrics: dict[str, str] = field(default_factory=dict)
    dependencies: dict[str, str] = field(default_factory=dict)
    context: dict = field(default_factory=dict)


def load_probes(path: str = "") -> dict:
    source = Path(path) if path else DEFAULT_PROBES_FILE
    try:
        spec = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProbeConfigError(f"{source}: cannot read probes: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("defaults", {}), dict) or not isinstance(spec.get("services", {}), dict):
        raise ProbeConfigError(f"{source}: expected mappings 'defaults' and 'services'")
    for section in ("metrics", "dependencies"):
        for scope, body in [("defaults", spec.get("defaults", {}))] + [(f"services.{k}", v) for k, v in spec.get("services", {}).items()]:
            queries = (body or {}).get(section, {})
            if not isinstance(queries, dict) or not all(isinstance(q, str) for q in queries.values()):
                raise ProbeConfigError(f"{source}: {scope}.{section} must map names to PromQL strings")
    return spec


def resolve_target(labels: dict, alert_name: str, probes: dict) -> Target:
    defaults = probes.get("defaults", {}) or {}
    service = service_of(labels) or ""
    per_service = (probes.get("services", {}) or {}).get(service, {}) or {}
    namespace = labels.get("namespace") or per_service.get("namespace") or defaults.get("namespace") or "default"
    context = {"service": service, "namespace": namespace, "alertname": alert_name, "labels": labels}
    deployment = labels.get("deployment") or per_service.get("deployment")
    if not deployment and service and defaults.get("deployment"):
        deployment = render(defaults["deployment"], context)
    context["deployment"] = deployment or ""
    selector = None
    if not deployment and labels.get("app"):
        selector = f"app={labels['app']}"
    metrics = {**(defaults.get("metrics") or {}), **(per_service.get("metrics") or {})}
    dependencies = {**(defaults.get("dependencies") or {}), **(per_service.get("dependencies") or {})}
    return Target(service, namespace, deployment, labels.get("pod"), selector, metrics, dependencies, context)


# --------------------------------------------------------------------------- Kubernetes


def _container_summary(pod) -> dict:
    statuses = (pod.status.container_statuses or []) if pod.status else []
    waiting = [s.state.waiting.reason for s in statuses if s.state and s.state.waiting and s.state.waiting.reason]
    terminated = [
        s.last_state.terminated.reason
        for s in statuses
        if s.last_state and s.last_state.terminated and s.last_state.terminated.reason
    ]
    return {
        "name": pod.metadata.name,
        "phase": pod.status.phase if pod.status else None,
        "ready": bool(statuses) and all(s.ready for s in statuses),
        "restarts": sum(s.restart_count or 0 for s in statuses),
        "waiting_reasons": waiting,
        "last_terminated_reasons": terminated,
        "node": pod.spec.node_name if pod.spec else None,
        "reason": pod.status.reason if pod.status else None,
    }


def summarise_pods(pods: list) -> dict:
    details = [_container_summary(p) for p in pods]
    ready = sum(1 for d in details if d["ready"])
    waiting = [r for d in details for r in d["waiting_reasons"]]
    evicted = [d for d in details if d["reason"] == "Evicted"]
    if waiting:
        status = max(set(waiting), key=waiting.count)
    elif not details:
        status = "NoPods"
    elif evicted:
        status = "Evicted"
    elif all(d["phase"] == "Running" for d in details):
        status = "Running"
    else:
        phases = [d["phase"] or "Unknown" for d in details if d["phase"] != "Running"]
        status = max(set(phases), key=phases.count)
    return {
        "ready": f"{ready}/{len(details)}",
        "status": status,
        "restarts": sum(d["restarts"] for d in details),
        "waiting_reasons": sorted(set(waiting)),
        "last_terminated_reasons": sorted({r for d in details for r in d["last_terminated_reasons"]}),
        "nodes": sorted({d["node"] for d in details if d["node"]}),
        "pods": details,
    }


def probe_pods(target: Target, timeout: float) -> Any:
    api = kube.api_client()
    if api is None:
        return NOT_CONFIGURED
    from kubernetes import client

    core = client.CoreV1Api(api)
    if target.pod:
        pod = core.read_namespaced_pod(target.pod, target.namespace, _request_timeout=timeout)
        return {target.pod: summarise_pods([pod])}
    if target.deployment:
        apps = client.AppsV1Api(api)
        deployment = apps.read_namespaced_deployment(target.deployment, target.namespace, _request_timeout=timeout)
        match = (deployment.spec.selector.match_labels or {}) if deployment.spec and deployment.spec.selector else {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
        pods = core.list_namespaced_pod(target.namespace, label_selector=selector, _request_timeout=timeout).items
        summary = summarise_pods(pods)
        status = deployment.status
        summary["replicas"] = {
            "desired": deployment.spec.replicas if deployment.spec else None,
            "ready": (status.ready_replicas or 0) if status else 0,
            "available": (status.available_replicas or 0) if status else 0,
            "updated": (status.updated_replicas or 0) if status else 0,
        }
        summary["ready"] = f"{summary['replicas']['ready']}/{summary['replicas']['desired']}" if summary["replicas"]["desired"] is not None else summary["ready"]
        return {target.deployment: summary}
    if target.selector:
        pods = core.list_namespaced_pod(target.namespace, label_selector=target.selector, _request_timeout=timeout).items
        return {target.selector.split("=", 1)[1]: summarise_pods(pods)}
    return {"error": "the alert names no workload (labels deployment, service, app or pod)"}


# --------------------------------------------------------------------------- Prometheus


def _prometheus(url: str, timeout: float):
    from prometheus_api_client import PrometheusConnect
    from urllib3.util.retry import Retry

    return PrometheusConnect(url=url, disable_ssl=False, retry=Retry(total=0), timeout=timeout)


def _scalar(result: list) -> float | None:
    values = []
    for series in result:
        value = series.get("value") if isinstance(series, dict) else None
        if value:
            number = float(value[1])
            if number == number and number not in (float("inf"), float("-inf")):  # drop NaN/Inf
                values.append(number)
    if not values:
        return None
    return round(values[0], 6) if len(values) == 1 else round(sum(values), 6)


def _queries(queries: dict[str, str], target: Target, prometheus_url: str, timeout: float, interpret) -> Any:
    """Run each PromQL template; one query failing must not hide the others."""
    if not prometheus_url:
        return NOT_CONFIGURED
    prom = _prometheus(prometheus_url, timeout)
    out: dict[str, Any] = {}
    for name, template in sorted(queries.items()):
        try:
            out[name] = interpret(prom.custom_query(render(template, target.context, promql_string)))
        except TemplateError as exc:
            out[name] = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded in its place
            out[name] = {"error": _describe(exc)}
    return out


def dependency_state(result: list) -> str:
    values = [float(s["value"][1]) for s in result if isinstance(s, dict) and s.get("value")]
    if not values:
        return "unknown"
    return "down" if min(values) < 1 else "up"


def probe_metrics(target: Target, prometheus_url: str, timeout: float) -> Any:
    return _queries(target.metrics, target, prometheus_url, timeout, _scalar)


def probe_dependencies(target: Target, prometheus_url: str, timeout: float) -> Any:
    return _queries(target.dependencies, target, prometheus_url, timeout, dependency_state)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status and reason:
        return f"HTTP {status} {reason}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- the run


class Collector:
    def __init__(self, config: Settings, probes: dict):
        self.config = config
        self.probes = probes

    def collect(self, incident: dict) -> dict:
        target = resolve_target(incident.get("labels") or {}, incident["alert_name"], self.probes)
        timeout = self.config.probe_timeout_seconds
        jobs: dict[str, Callable[[], Any]] = {
            "pods": lambda: probe_pods(target, timeout),
            "metrics": lambda: probe_metrics(target, self.config.prometheus_url, timeout),
            "dependencies": lambda: probe_dependencies(target, self.config.prometheus_url, timeout),
        }
        results: dict[str, Any] = {}
        durations: dict[str, float] = {}
        started = time.monotonic()
        executor = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="probe")

        def timed(name, job):
            begin = time.monotonic()
            try:
                return job()
            finally:
                durations[name] = round((time.monotonic() - begin) * 1000, 1)

        futures = {name: executor.submit(timed, name, job) for name, job in jobs.items()}
        deadline = started + self.config.diagnostics_deadline_seconds
        for name, future in futures.items():
            try:
                # Each probe has its own timeout; this bounds a probe whose
                # client ignores it, so one hang cannot stall the run.
                results[name] = future.result(timeout=max(0.0, min(deadline, time.monotonic() + timeout * 2) - time.monotonic()))
            except FutureTimeout:
                results[name] = {"error": f"timed out after {timeout:g}s"}
                durations.setdefault(name, round((time.monotonic() - started) * 1000, 1))
            except Exception as exc:  # noqa: BLE001 - recorded in its place
                results[name] = {"error": _describe(exc)}
        executor.shutdown(wait=False, cancel_futures=True)
        for name, value in results.items():
            if isinstance(value, dict) and "error" in value:
                log.warning("Probe failed", extra={"incident_id": incident["id"], "probe": name, "error": value["error"]})
        return {
            **results,
            "target": {"service": target.service, "namespace": target.namespace, "deployment": target.deployment, "pod": target.pod},
            "collected_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "durations_ms": durations,
        }
