"""Diagnostics of one incident: facts from Kubernetes (pods, events, logs,
rollout history, configuration, nodes) and Prometheus (metrics,
dependencies), read concurrently, each call bounded by its own timeout and
all by a deadline, then the probable causes ranked by functions.diagnostics.
causes. A source that fails is recorded as ``{"error": ...}`` (and as a
``source/<name>`` fact) and the others still count."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from functions.diagnostics.causes import rank
from functions.diagnostics.facts import (
    Limits, Reader, Window, config_refs, configmap_fact, describe, event_facts, hpa_fact, iso, log_fact, log_targets,
    node_fact, owned_by, parse_time, rollout_facts, secret_fact, summarise_pods,
)
from functions.diagnostics.probes import DEFAULT_PROBES_FILE, SAFE_LOADER, ProbeConfigError, load_probes  # noqa: F401 - this module's API too
from shared import kube
from shared.config import Settings
from shared.domain import service_of
from shared.templating import TemplateError, render, render_promql

log = logging.getLogger("diagnostics")

NOT_CONFIGURED = "not configured"
KUBE_SECTIONS = ("pods", "events", "logs", "changes", "nodes")
# Each source is a fact of its own (``source/<name>``): ok, error or not configured.
SOURCES = ("pods", "events", "logs", "changes", "config", "scaling", "nodes", "metrics", "dependencies")
# Key order of the stored diagnosis (it is compared byte for byte).
ORDER = ("target", "window", "pods", "metrics", "dependencies", "events", "logs", "changes", "nodes", "sources")
WORKERS = 8
# Events listed per call before filtering to the target's objects.
EVENTS_READ_MAX = 500
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


# --------------------------------------------------------------------------- Prometheus


class _Prometheus:
    """Instant queries, each with its whole answer within ``timeout``
    (shared.deadline): a Prometheus that trickles its answer fails that
    query at the probe timeout instead of holding a probe thread past the
    diagnosis."""

    def __init__(self, url: str, timeout: float):
        import requests
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        from shared.deadline import DeadlineAdapter, bounded

        self.timeout = timeout
        http = requests.Session()
        self.client = PrometheusConnect(url=url, disable_ssl=False, retry=Retry(total=0), timeout=timeout, session=http)
        # The client mounts a plain adapter for its URL: the same one that
        # keeps the bound replaces it.
        http.mount(url, DeadlineAdapter(max_retries=Retry(total=0)))
        # And for every other URL: a redirect to another host keeps the bound too.
        bounded(http)

    def query(self, promql: str) -> list:
        from shared.deadline import within

        with within(self.timeout):
            return self.client.custom_query(promql)


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


def dependency_state(result: list) -> str:
    values = [float(s["value"][1]) for s in result if isinstance(s, dict) and s.get("value")]
    if not values:
        return "unknown"
    return "down" if min(values) < 1 else "up"


# --------------------------------------------------------------------------- the run


class _Run:
    """Futures of one diagnosis, each waited for no longer than the deadline
    leaves; a call whose client ignores its timeout cannot stall the run."""

    def __init__(self, executor: ThreadPoolExecutor, deadline: float):
        self.executor = executor
        self.deadline = deadline
        self.durations: dict[str, float] = {}
        self.started = time.monotonic()

    def submit(self, name: str, job, *args) -> Future:
        def timed():
            begin = time.monotonic()
            try:
                return job(*args)
            finally:
                # Several calls make one source: its duration is the longest.
                self.durations[name] = max(self.durations.get(name, 0.0), round((time.monotonic() - begin) * 1000, 1))
        return self.executor.submit(timed)

    def result(self, name: str, future: Future) -> tuple[Any, str | None]:
        """(value, None) or (None, error text)."""
        try:
            return future.result(timeout=max(0.0, self.deadline - time.monotonic())), None
        except FutureTimeout:
            self.durations.setdefault(name, round((time.monotonic() - self.started) * 1000, 1))
            return None, "timed out: the diagnosis deadline passed"
        except Exception as exc:  # noqa: BLE001 - recorded in its place
            return None, describe(exc)


def _selector_of(deployment: dict) -> str:
    match = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def _workload(reader: Reader, target: Target) -> tuple[dict | None, list[dict], str | None]:
    """(Deployment, pods, selector) of the target."""
    if target.pod:
        return None, [reader.pod(target.namespace, target.pod)], None
    if target.deployment:
        deployment = reader.deployment(target.namespace, target.deployment)
        selector = _selector_of(deployment)
        return deployment, reader.pods(target.namespace, selector), selector
    if target.selector:
        return None, reader.pods(target.namespace, target.selector), target.selector
    raise LookupError("the alert names no workload (labels deployment, service, app or pod)")


def _pods_section(target: Target, deployment: dict | None, pods: list[dict]) -> dict:
    summary = summarise_pods(pods)
    if deployment is not None:
        spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
        summary["replicas"] = {
            "desired": spec.get("replicas"),
            "ready": status.get("readyReplicas") or 0,
            "available": status.get("availableReplicas") or 0,
            "updated": status.get("updatedReplicas") or 0,
        }
        if spec.get("replicas") is not None:
            summary["ready"] = f"{summary['replicas']['ready']}/{spec['replicas']}"
    name = target.pod or target.deployment or (target.selector or "=").split("=", 1)[1]
    return {name: summary}


def _read_log(reader: Reader, namespace: str, pod: str, container: str, previous: bool, limits: Limits) -> dict | None:
    try:
        text = reader.log(namespace, pod, container, previous, limits.log_lines, limits.log_bytes)
    except Exception as exc:
        if getattr(exc, "status", None) == 400:
            return None  # the container is waiting, or never ran before
        raise
    return log_fact(pod, container, previous, text, limits)


def _configmap(reader: Reader, namespace: str, name: str, window: Window) -> dict:
    try:
        return configmap_fact(name, reader.configmap_metadata(namespace, name), window)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return configmap_fact(name, None, window, error="not found")
        raise


def _queries_each(run: _Run, section: str, queries: dict[str, str], target: Target, prom, interpret) -> dict[str, Any] | str:
    """name → the future of its query, or the text of its template's error."""
    if prom is None:
        return NOT_CONFIGURED
    out: dict[str, Any] = {}
    for name, template in sorted(queries.items()):
        try:
            promql = render_promql(template, target.context)
        except TemplateError as exc:
            out[name] = str(exc)
            continue
        out[name] = run.submit(section, lambda q=promql: interpret(prom.query(q)))
    return out


def _gather_queries(run: _Run, section: str, futures) -> Any:
    """One query failing must not hide the others."""
    if isinstance(futures, str):
        return futures
    out = {}
    for name, future in futures.items():
        value, error = (None, future) if isinstance(future, str) else run.result(section, future)
        out[name] = {"error": error} if error else value
    return out


class Collector:
    def __init__(self, config: Settings, probes: dict):
        self.config = config
        self.probes = probes
        self.limits = Limits.from_spec(probes.get("diagnosis"))

    def collect(self, incident: dict) -> dict:
        target = resolve_target(incident.get("labels") or {}, incident["alert_name"], self.probes)
        timeout = self.config.probe_timeout_seconds
        now = datetime.now(timezone.utc)
        onset = parse_time(incident.get("starts_at")) or now
        window = Window.before(min(onset, now), self.limits)
        # Clients are configured (and their modules imported) before the clock
        # starts: the deadline bounds the calls, not a cold start.
        api = kube.api_client()
        reader = Reader(api, timeout) if api is not None else None
        prom = _Prometheus(self.config.prometheus_url, timeout) if self.config.prometheus_url else None
        executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="probe")
        run = _Run(executor, time.monotonic() + self.config.diagnostics_deadline_seconds)
        try:
            diagnostics = self._collect(run, reader, prom, target, window)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        for source in diagnostics["sources"]:
            if source["state"] == "error":
                log.warning("Probe failed", extra={"incident_id": incident["id"], "probe": source["name"], "error": source["error"]})
        diagnostics["probable_causes"] = rank(diagnostics)
        diagnostics["collected_at"] = iso(now)
        # A call that outlived the deadline may still write its duration: copy first.
        durations = dict(run.durations)
        diagnostics["durations_ms"] = {k: durations[k] for k in sorted(durations)}
        return diagnostics

    def _collect(self, run: _Run, reader: Reader | None, prom, target: Target, window: Window) -> dict:
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}
        # The workload is read first: the second round of Kubernetes calls waits for it.
        workload = run.submit("pods", _workload, reader, target) if reader else None
        metrics = _queries_each(run, "metrics", target.metrics, target, prom, _scalar)
        dependencies = _queries_each(run, "dependencies", target.dependencies, target, prom, dependency_state)
        if reader is None:
            for name in KUBE_SECTIONS:
                out[name] = NOT_CONFIGURED
        else:
            self._kube(run, reader, workload, target, window, out, errors)
        out["metrics"] = _gather_queries(run, "metrics", metrics)
        out["dependencies"] = _gather_queries(run, "dependencies", dependencies)
        for section in ("metrics", "dependencies"):
            value = out[section]
            if isinstance(value, dict) and value and all(isinstance(v, dict) and "error" in v for v in value.values()):
                errors[section] = sorted({v["error"] for v in value.values()})[0]
        out["sources"] = [_source_fact(name, out, errors) for name in SOURCES]
        out["window"] = {"from": iso(window.start), "to": iso(window.onset)}
        out["target"] = {"service": target.service, "namespace": target.namespace, "deployment": target.deployment, "pod": target.pod}
        return {k: out[k] for k in ORDER if k in out}

    def _kube(self, run: _Run, reader: Reader, workload: Future, target: Target, window: Window, out: dict, errors: dict) -> None:
        limits, ns = self.limits, target.namespace
        events = run.submit("events", reader.events, ns, EVENTS_READ_MAX)
        hpas = run.submit("scaling", reader.hpas, ns) if target.deployment else None
        value, error = run.result("pods", workload)
        if error:
            deployment, pods, selector = None, [], None
            errors["pods"] = error
            out["pods"] = {"error": error}
        else:
            deployment, pods, selector = value
            out["pods"] = _pods_section(target, deployment, pods)
        pod_facts = [p for section in out["pods"].values() if isinstance(section, dict) for p in section.get("pods", [])] if not error else []

        # The second round needs the workload: its ReplicaSets, logs, nodes, configuration.
        replicasets = run.submit("changes", reader.replicasets, ns, selector) if deployment is not None and selector else None
        logs = [run.submit("logs", _read_log, reader, ns, pod, container, previous, limits)
                for pod, container, previous in log_targets(pod_facts, limits.logged_pods_max)]
        node_names = sorted({p["node"] for p in pod_facts if p["node"]})[: limits.nodes_max]
        nodes = {n: run.submit("nodes", reader.node, n) for n in node_names}
        node_events = {n: run.submit("events", reader.node_events, n, EVENTS_READ_MAX) for n in node_names}
        template_spec = (((deployment or {}).get("spec") or {}).get("template") or {}).get("spec") \
            or ((pods[0].get("spec") or {}) if pods else {})
        map_names, secret_names = config_refs(template_spec)
        configmaps = [run.submit("config", _configmap, reader, ns, name, window) for name in map_names[: limits.config_max]]

        # Logs
        log_facts, log_errors = [], []
        for future in logs:
            value, error = run.result("logs", future)
            if error:
                log_errors.append(error)
            elif value is not None:
                log_facts.append(value)
        out["logs"] = {"error": log_errors[0]} if log_errors and not log_facts else log_facts
        if log_errors:
            errors["logs"] = log_errors[0]

        # Rollout history, configuration, scaling
        changes: dict[str, Any] = {"revisions": [], "diff": None, "config": [], "scaling": []}
        rs_items: list[dict] = []
        if replicasets is not None:
            value, error = run.result("changes", replicasets)
            if error:
                changes["revisions"] = {"error": error}
                errors["changes"] = error
            else:
                rs_items = value
                changes["revisions"], changes["diff"] = rollout_facts(value, target.deployment, window, limits.revisions_max)
        config_facts, config_error = [], None
        for future in configmaps:
            value, error = run.result("config", future)
            if error:
                config_error = config_error or error
            else:
                config_facts.append(value)
        changes["config"] = config_facts + [secret_fact(n) for n in secret_names[: limits.config_max]]
        if config_error:
            changes["config"] = {"error": config_error}
            errors["config"] = config_error
        hpa_names: list[str] = []
        if hpas is not None:
            value, error = run.result("scaling", hpas)
            if error:
                changes["scaling"] = {"error": error}
                errors["scaling"] = error
            else:
                mine = [h for h in value if ((h.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == target.deployment]
                changes["scaling"] = sorted((hpa_fact(h) for h in mine), key=lambda f: f["id"])
                hpa_names = [h["metadata"]["name"] for h in mine]
        out["changes"] = changes

        # Nodes
        node_facts, node_error = [], None
        for name, future in nodes.items():
            value, error = run.result("nodes", future)
            if error:
                node_error = node_error or error
                node_facts.append({"id": f"node/{name}", "name": name, "error": error})
            else:
                node_facts.append(node_fact(value))
        out["nodes"] = node_facts
        if node_error:
            errors["nodes"] = node_error

        # Events: of the pods, their ReplicaSets, the Deployment, its HPAs and the nodes.
        objects = {("Pod", p["name"]) for p in pod_facts}
        objects |= {("ReplicaSet", o.get("name")) for p in pods for o in (p.get("metadata") or {}).get("ownerReferences") or []
                    if o.get("kind") == "ReplicaSet"}
        objects |= {("ReplicaSet", (rs.get("metadata") or {}).get("name")) for rs in rs_items if owned_by(rs, target.deployment)}
        objects |= {("HorizontalPodAutoscaler", n) for n in hpa_names} | {("Node", n) for n in node_names}
        if target.deployment:
            objects.add(("Deployment", target.deployment))
        raw, events_error = [], None
        value, error = run.result("events", events)
        if error:
            events_error = error
        else:
            raw += value
        for future in node_events.values():
            value, error = run.result("events", future)
            if error:
                events_error = events_error or error
            else:
                raw += value
        if events_error and not raw:
            out["events"] = {"error": events_error}
        else:
            out["events"], _ = event_facts(raw, objects, window, limits.events_max)
        if events_error:
            errors["events"] = events_error


def _source_fact(name: str, out: dict, errors: dict) -> dict:
    value = out.get(name if name in out else "changes")
    if value == NOT_CONFIGURED or (name in ("metrics", "dependencies") and value == NOT_CONFIGURED):
        state = "not configured"
    else:
        state = "error" if name in errors else "ok"
    fact = {"id": f"source/{name}", "name": name, "state": state}
    if state == "error":
        fact["error"] = errors[name]
    return fact
