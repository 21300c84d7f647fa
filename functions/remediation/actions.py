"""Remediation actions: small typed functions registered by name.

Each action has a pydantic parameter model (validated when playbooks load),
names its target so the rails can judge it before it runs, reads the current
state even in dry-run (reading changes nothing), and verifies what it did:
success means verified, not merely accepted by the API.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared import kube
from shared.config import Settings

MERGE_PATCH = "application/merge-patch+json"
# What `kubectl rollout undo` sends: an RFC 6902 patch replacing the template.
JSON_PATCH = "application/json-patch+json"
REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
# Deployment annotations `kubectl rollout undo` keeps from the deployment
# instead of copying them from the ReplicaSet (kubectl's annotationsToSkip).
ANNOTATIONS_TO_SKIP = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration",
    "deprecated.deployment.rollback.to",
    REVISION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
})
# What `kubectl rollout restart` sends.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

# Every Kubernetes API call the actions make, for the RBAC Role (a test keeps
# knative/ in step with this list).
KUBERNETES_PERMISSIONS = {
    ("apps", "deployments", "get"),
    ("apps", "deployments", "patch"),
    ("apps", "deployments/scale", "get"),
    ("apps", "deployments/scale", "patch"),
    ("apps", "replicasets", "list"),
    ("", "pods", "list"),
    ("", "pods", "delete"),
    ("batch", "jobs", "create"),
    ("", "nodes", "get"),
    ("", "nodes", "patch"),
}


class ActionFailed(Exception):
    """The action could not do (or verify) what it set out to do."""


class NotConfigured(ActionFailed):
    """What the action needs (Kubernetes, a DSN) is not configured."""


class BlastRadiusExceeded(ActionFailed):
    """The action would change more than one action may (judged on the
    state read before acting, in dry-run too)."""


@dataclass(frozen=True)
class TargetRef:
    kind: str
    name: str
    namespace: str | None = None  # None: cluster-scoped or outside Kubernetes

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass
class ActionContext:
    config: Settings
    incident: dict
    dry_run: bool
    verify_timeout: float
    poll_interval: float = 0.5

    def kube(self):
        api = kube.api_client()
        if api is None:
            raise NotConfigured(f"Kubernetes is not configured ({kube.not_configured_reason()})")
        return api


@dataclass
class Outcome:
    target: str
    before: Any = None
    after: Any = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpec:
    name: str
    params: type[BaseModel]
    run: Callable[[ActionContext, Any], Outcome]
    target: Callable[[Any], TargetRef]
    changes_replicas: bool = False


REGISTRY: dict[str, ActionSpec] = {}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def action(name: str, params: type[Params], target: Callable[[Any], TargetRef]):
    def register(fn: Callable[[ActionContext, Any], Outcome]):
        REGISTRY[name] = ActionSpec(name, params, fn, target)
        return fn

    return register


def _k8s_error(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status:
        body = getattr(exc, "body", "") or ""
        message = ""
        try:
            import json

            message = json.loads(body).get("message", "")
        except Exception:  # noqa: BLE001 - the status line is enough
            pass
        return f"Kubernetes API {status} {reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"[:300]


def _call(fn, *args, **kwargs):
    """A Kubernetes call whose failure becomes an ActionFailed with a clear error."""
    try:
        return fn(*args, **kwargs)
    except ActionFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - ApiException, timeouts, connection errors
        raise ActionFailed(_k8s_error(exc)) from None


def _wait(ctx: ActionContext, check: Callable[[], tuple[bool, str]]) -> None:
    deadline = time.monotonic() + ctx.verify_timeout
    while True:
        done, state = check()
        if done:
            return
        if time.monotonic() >= deadline:
            raise ActionFailed(f"not verified after {ctx.verify_timeout:g}s: {state}")
        time.sleep(ctx.poll_interval)


# --------------------------------------------------------------------------- deployments


class DeploymentParams(Params):
    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)


class ScaleParams(DeploymentParams):
    replicas: int = Field(ge=1, le=1000)


def _deployment_target(p: DeploymentParams) -> TargetRef:
    return TargetRef("deployment", p.name, p.namespace)


class _Deployments:
    """The Deployment calls of the actions, as the API server's JSON through
    the client's ApiClient (shared/kuberaw.py): AppsV1Api's module would load
    a pydantic model for every apps/v1 type on a cold instance's first
    action, and a rollback must restore a template whole, with fields a
    model would drop. Each failure is an ActionFailed (``_call``)."""

    PATH = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}"

    def __init__(self, api, timeout: float):
        self.api, self.timeout = api, timeout

    def _call(self, method: str, path: str, params: dict, **options) -> dict:
        from shared import kuberaw

        return _call(kuberaw.call, self.api, method, path, params, timeout=self.timeout, **options)

    def read(self, p: DeploymentParams) -> dict:
        return self._call("GET", self.PATH, {"name": p.name, "namespace": p.namespace})

    def patch(self, p: DeploymentParams, body, content_type: str) -> dict:
        return self._call("PATCH", self.PATH, {"name": p.name, "namespace": p.namespace}, body=body, content_type=content_type)

    def replicas(self, p: DeploymentParams) -> int:
        scale = self._call("GET", self.PATH + "/scale", {"name": p.name, "namespace": p.namespace})
        return (scale.get("spec") or {}).get("replicas") or 0

    def scale(self, p: DeploymentParams, replicas: int) -> None:
        self._call("PATCH", self.PATH + "/scale", {"name": p.name, "namespace": p.namespace},
                   body={"spec": {"replicas": replicas}}, content_type=MERGE_PATCH)

    def replica_sets(self, namespace: str, selector: str) -> list[dict]:
        from shared import kuberaw

        return _call(kuberaw.items, self.api, "/apis/apps/v1/namespaces/{namespace}/replicasets", {"namespace": namespace},
                     {"labelSelector": selector}, what=f"ReplicaSets in {namespace} match {selector}", timeout=self.timeout)


def _apps(ctx: ActionContext) -> _Deployments:
    return _Deployments(ctx.kube(), ctx.config.probe_timeout_seconds)


def _status(d: dict, field_name: str) -> int:
    return (d.get("status") or {}).get(field_name) or 0


def _ready_replicas(apps: _Deployments, p: DeploymentParams) -> tuple[int, int]:
    d = apps.read(p)
    return _status(d, "readyReplicas"), (d.get("spec") or {}).get("replicas") or 0


@action("scale_deployment", ScaleParams, _deployment_target)
def scale_deployment(ctx: ActionContext, p: ScaleParams) -> Outcome:
    """Scale to an absolute count, never down, never above the ceiling."""
    apps = _apps(ctx)
    current = apps.replicas(p)
    ceiling = ctx.config.remediation_max_replicas
    wanted = min(p.replicas, ceiling)
    details = {"requested": p.replicas, "ceiling": ceiling} if p.replicas > ceiling else {}
    if wanted <= current:
        # Never scale down: a human or an HPA may have had a reason.
        return Outcome(p.name, current, current, {**details, "note": f"already at {current} replicas"})
    limit = ctx.config.remediation_max_replica_change
    if wanted - current > limit:
        raise BlastRadiusExceeded(f"scaling {p.namespace}/{p.name} from {current} to {wanted} changes {wanted - current} replicas; "
                                  f"REMEDIATION_MAX_REPLICA_CHANGE allows {limit}")
    if ctx.dry_run:
        return Outcome(p.name, current, wanted, details)
    _scale_to(ctx, apps, p, wanted)
    return Outcome(p.name, current, wanted, details)


def _scale_to(ctx: ActionContext, apps: _Deployments, p: DeploymentParams, wanted: int) -> None:
    apps.scale(p, wanted)

    def ready():
        have, _ = _ready_replicas(apps, p)
        return have >= wanted, f"{have}/{wanted} replicas ready"

    _wait(ctx, ready)


def revert_scale(ctx: ActionContext, p: DeploymentParams, replicas: int) -> Outcome:
    """Back to the count recorded before the action: the one scale-down
    remediation makes, because it only undoes its own scale-up."""
    apps = _apps(ctx)
    current = apps.replicas(p)
    if current != replicas:
        _scale_to(ctx, apps, p, replicas)
    return Outcome(p.name, current, replicas)


@action("rollout_restart", DeploymentParams, _deployment_target)
def rollout_restart(ctx: ActionContext, p: DeploymentParams) -> Outcome:
    """What `kubectl rollout restart` does: bump the pod template annotation."""
    apps = _apps(ctx)
    before = apps.read(p)
    previous = (((before["spec"]["template"].get("metadata") or {}).get("annotations")) or {}).get(RESTARTED_AT)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if ctx.dry_run:
        return Outcome(p.name, previous, stamp)
    patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
    patched = apps.patch(p, patch, STRATEGIC_MERGE_PATCH)
    _wait_rolled_out(ctx, apps, p, patched["metadata"].get("generation") or 0)
    return Outcome(p.name, previous, stamp)


def _wait_rolled_out(ctx: ActionContext, apps: _Deployments, p: DeploymentParams, generation: int) -> None:
    """What `kubectl rollout status` waits for: the controller saw the new
    generation and every replica is updated and ready."""

    def rolled_out():
        d = apps.read(p)
        want = (d.get("spec") or {}).get("replicas") or 0
        observed, updated, ready = _status(d, "observedGeneration"), _status(d, "updatedReplicas"), _status(d, "readyReplicas")
        return observed >= generation and updated >= want and ready >= want, f"generation {observed}/{generation}, {updated} updated, {ready}/{want} ready"

    _wait(ctx, rolled_out)


class RollbackParams(DeploymentParams):
    to_revision: int | None = Field(default=None, ge=1, description="a named revision; none: the previous one")
    rolled_out_within_seconds: float | None = Field(
        default=None, gt=0, le=7 * 86400,
        description="only when the current revision was rolled out this recently (a fresh release); else refused")


def _selector(match: dict) -> str:
    terms = [f"{k}={v}" for k, v in sorted((match.get("matchLabels") or {}).items())]
    for e in match.get("matchExpressions") or []:
        op = {"In": "in", "NotIn": "notin"}.get(e["operator"])
        if op:
            terms.append(f"{e['key']} {op} ({','.join(e.get('values') or [])})")
        else:
            terms.append(e["key"] if e["operator"] == "Exists" else f"!{e['key']}")
    return ",".join(terms)


def _revision(obj: dict) -> int | None:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION)
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return None


def _without_hash(template: dict) -> dict:
    import copy

    template = copy.deepcopy(template)
    ((template.get("metadata") or {}).get("labels") or {}).pop(HASH_LABEL, None)
    return template


def _images(template: dict) -> list[str]:
    return [c.get("image", "") for c in ((template.get("spec") or {}).get("containers") or [])]


def rollout_history(ctx: ActionContext, apps: _Deployments, p: DeploymentParams) -> tuple[dict, list[dict]]:
    """The deployment and the ReplicaSets it controls, as `kubectl rollout
    undo` finds them: listed by the deployment's selector, kept when their
    controller reference is this deployment."""
    deployment = apps.read(p)
    selector = _selector(deployment["spec"].get("selector") or {})
    listed = apps.replica_sets(p.namespace, selector)
    uid = deployment["metadata"].get("uid")
    owned = [rs for rs in listed if any(o.get("controller") and o.get("uid") == uid for o in rs["metadata"].get("ownerReferences") or [])]
    return deployment, owned


def _revision_to(deployment: dict, owned: list[dict], to_revision: int | None) -> tuple[dict, int | None]:
    latest, previous = (None, -1), (None, -1)
    for rs in owned:
        v = _revision(rs)
        if v is None:
            continue
        if to_revision is not None:
            if v == to_revision:
                return rs, _current_revision(owned)
        elif v > latest[1]:
            previous, latest = latest, (rs, v)
        elif v > previous[1]:
            previous = (rs, v)
    if to_revision is not None:
        raise ActionFailed(f"unable to find specified revision {to_revision} in history of deployment {deployment['metadata']['name']!r}")
    if previous[0] is None:
        raise ActionFailed(f"no rollout history found for deployment {deployment['metadata']['name']!r}: there is no previous revision to roll back to")
    return previous[0], latest[1]


def _current_revision(owned: list[dict]) -> int | None:
    revisions = [v for v in (_revision(rs) for rs in owned) if v is not None]
    return max(revisions) if revisions else None


def _fresh_release(deployment: dict, owned: list[dict], current: int | None, window: float) -> None:
    """Refuse unless the current revision's ReplicaSet was created within the
    window: a crash loop that began long after the last release is not the
    release's fault, and rolling back would undo a good one."""
    newest = next((rs for rs in owned if _revision(rs) == current), None)
    created = (newest or {}).get("metadata", {}).get("creationTimestamp")
    if not created:
        raise ActionFailed(f"cannot tell when revision {current} of {deployment['metadata']['name']!r} was rolled out")
    age = (datetime.now(timezone.utc) - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
    if age > window:
        raise ActionFailed(f"revision {current} of {deployment['metadata']['name']!r} was rolled out {age:.0f}s ago, "
                           f"before the {window:g}s window: not a fresh release, not rolling back")


@action("rollback_deployment", RollbackParams, _deployment_target)
def rollback_deployment(ctx: ActionContext, p: RollbackParams) -> Outcome:
    """What `kubectl rollout undo` does: the previous (or named) revision's
    ReplicaSet template, without its pod-template-hash label, replaces the
    deployment's template in one JSON patch; then readiness is awaited."""
    apps = _apps(ctx)
    deployment, owned = rollout_history(ctx, apps, p)
    rs, current = _revision_to(deployment, owned, p.to_revision)
    target_revision = _revision(rs)
    details = {"revision": {"from": current, "to": target_revision}, "replicaset": rs["metadata"]["name"],
               "images": {"from": _images(deployment["spec"]["template"]), "to": _images(rs["spec"]["template"])}}
    if p.rolled_out_within_seconds is not None:
        _fresh_release(deployment, owned, current, p.rolled_out_within_seconds)
    if deployment["spec"].get("paused"):
        raise ActionFailed(f"deployment {p.name!r} is paused; resume it first (kubectl rollout resume deployment/{p.name})")
    if _without_hash(rs["spec"]["template"]) == _without_hash(deployment["spec"]["template"]):
        return Outcome(p.name, current, current, {**details, "note": f"skipped: the template already matches revision {target_revision}"})
    if ctx.dry_run:
        return Outcome(p.name, current, target_revision, details)
    template = _without_hash(rs["spec"]["template"])
    kept = (deployment["metadata"].get("annotations") or {})
    annotations = {k: v for k, v in kept.items() if k in ANNOTATIONS_TO_SKIP}
    annotations.update({k: v for k, v in (rs["metadata"].get("annotations") or {}).items() if k not in ANNOTATIONS_TO_SKIP})
    patch = [
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/metadata/annotations", "value": annotations},
    ]
    patched = apps.patch(p, patch, JSON_PATCH)
    _wait_rolled_out(ctx, apps, p, patched["metadata"].get("generation") or 0)
    return Outcome(p.name, current, target_revision, details)


# --------------------------------------------------------------------------- pods


class DeletePodsParams(Params):
    namespace: str = Field(min_length=1, max_length=63)
    selector: str | None = Field(default=None, description="label selector, e.g. app=email-service")
    pod: str | None = Field(default=None, description="one pod by name")
    reasons: list[str] = Field(
        default_factory=lambda: ["CrashLoopBackOff", "Evicted", "Failed"],
        description="delete pods whose waiting reason, status reason or phase is one of these; ['*'] for any",
    )
    max_pods: int = Field(default=10, ge=1, le=100)

    # Parameters are rendered from alert labels: a label that is present but
    # empty ("pod": "") must never turn into "no filter", which would select
    # every pod of the namespace.
    @field_validator("pod")
    @classmethod
    def _pod_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("pod is empty (the alert's pod label is empty); refusing to select every pod")
        return value

    @field_validator("selector")
    @classmethod
    def _selector_complete(cls, value: str | None) -> str | None:
        if value is not None:
            empty = selector_problem(value)
            if empty:
                raise ValueError(f"selector {value!r}: {empty}; refusing to widen the selection")
        return value

    @model_validator(mode="after")
    def _bounded(self) -> "DeletePodsParams":
        if self.pod is None and self.selector is None and "*" in self.reasons:
            raise ValueError("deleting pods in any state needs a pod or a selector, never a whole namespace")
        return self


def selector_problem(selector: str) -> str | None:
    """Why this label selector would match more than it names, or None:
    an empty selector, an empty term, or a term whose value is empty."""
    terms = [t.strip() for t in re.split(r",(?![^()]*\))", selector)]
    if not selector.strip() or any(not t for t in terms):
        return "it has an empty term"
    for term in terms:
        m = re.fullmatch(r"(!?)\s*([^=!\s(]+)\s*(?:(==|=|!=)\s*(.*)|\s+(in|notin)\s*\((.*)\))?", term)
        if m is None:
            return f"term {term!r} is not understood"
        op, value, set_op, values = m.group(3), m.group(4), m.group(5), m.group(6)
        if op and not value.strip():
            return f"term {term!r} has an empty value"
        if set_op and not [v for v in (values or "").split(",") if v.strip()]:
            return f"term {term!r} has an empty set"
        if op == "!=" or set_op == "notin" or m.group(1):
            return f"term {term!r} selects by exclusion"
    return None


def _pods_target(p: DeletePodsParams) -> TargetRef:
    return TargetRef("pods", p.pod or p.selector or "*", p.namespace)


def _workload_key(pod) -> tuple:
    """Which workload a pod belongs to: its controller, or (a bare pod) its labels."""
    owner = next((o.uid for o in pod.metadata.owner_references or [] if o.controller), None)
    return ("owner", owner) if owner else ("labels", tuple(sorted((pod.metadata.labels or {}).items())))


def _live(pod) -> bool:
    # A Failed or Succeeded pod serves nothing: removing it costs no capacity.
    return not (pod.status and pod.status.phase in ("Failed", "Succeeded"))


def _pod_blast_radius(ctx: ActionContext, p: DeletePodsParams, deleting: list, population: list) -> None:
    limit, share = ctx.config.remediation_max_pods_deleted, ctx.config.remediation_max_pods_deleted_share
    if len(deleting) > limit:
        raise BlastRadiusExceeded(f"deleting {len(deleting)} pods in {p.namespace}; REMEDIATION_MAX_PODS_DELETED allows {limit}")
    # The share is of each workload's live pods. One pod is always allowed:
    # replacing a single crash-looping replica is what delete_pods is for.
    for key in {_workload_key(x) for x in deleting if _live(x)}:
        live = [x for x in population if _live(x) and _workload_key(x) == key]
        gone = [x for x in deleting if _live(x) and _workload_key(x) == key]
        if len(gone) > 1 and live and len(gone) / len(live) > share:
            raise BlastRadiusExceeded(f"deleting {len(gone)} of the {len(live)} live pods of the workload ({len(gone) / len(live):.0%}); "
                                      f"REMEDIATION_MAX_PODS_DELETED_SHARE allows {share:.0%}")


def _pod_matches(pod, reasons: list[str]) -> bool:
    if "*" in reasons:
        return True
    status = pod.status
    found = {status.phase, status.reason} if status else set()
    for cs in (status.container_statuses or []) if status else []:
        if cs.state and cs.state.waiting:
            found.add(cs.state.waiting.reason)
        if cs.last_state and cs.last_state.terminated:
            found.add(cs.last_state.terminated.reason)
    return bool(found & set(reasons))


def _list_pods(core, namespace: str, selector: str, timeout: float) -> list:
    """Every pod the selector matches, a page at a time, each page within
    the timeout (shared.kuberaw.paged): the blast radius is judged on the
    whole population, so a namespace too large to read whole is a failed
    action, never a judgement on part of it."""
    from shared import kuberaw

    def read_page(limit: int, token: str | None) -> tuple[list, str | None]:
        page = core.list_namespaced_pod(namespace, label_selector=selector, limit=limit, _continue=token,
                                        _request_timeout=timeout)
        return page.items, page.metadata._continue if page.metadata else None
    return kuberaw.paged(read_page, f"pods in {namespace} match {selector or 'everything'}")


@action("delete_pods", DeletePodsParams, _pods_target)
def delete_pods(ctx: ActionContext, p: DeletePodsParams) -> Outcome:
    """Delete crash-looping, evicted or failed pods; their controller replaces them."""
    from kubernetes import client

    core = client.CoreV1Api(ctx.kube())
    timeout = ctx.config.probe_timeout_seconds
    selector = p.selector or ""
    pods = _call(_list_pods, core, p.namespace, selector, timeout)
    population = pods
    if p.pod:
        pods = [x for x in pods if x.metadata.name == p.pod]
    matching = [x for x in pods if _pod_matches(x, p.reasons)][: p.max_pods]
    names = [x.metadata.name for x in matching]
    _pod_blast_radius(ctx, p, matching, population)
    if not ctx.dry_run:
        for name in names:
            _call(core.delete_namespaced_pod, name, p.namespace, _request_timeout=timeout)
    return Outcome(_pods_target(p).name, len(matching), 0, {"pods": names})


# --------------------------------------------------------------------------- jobs


class RunJobParams(Params):
    namespace: str = Field(min_length=1, max_length=63)
    name_prefix: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    template: dict = Field(description="the Job's spec (template, backoffLimit, ...)")


@action("run_job", RunJobParams, lambda p: TargetRef("job", f"{p.name_prefix}-*", p.namespace))
def run_job(ctx: ActionContext, p: RunJobParams) -> Outcome:
    """Create a Job from the playbook's template (a log cleanup, a cache flush)."""
    from kubernetes import client

    incident_id = ctx.incident["id"]
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "generateName": f"{p.name_prefix}-",
            "namespace": p.namespace,
            "labels": {"app.kubernetes.io/managed-by": "incident-response", "incident-response/incident": incident_id},
        },
        "spec": {"ttlSecondsAfterFinished": 3600, **p.template},
    }
    if ctx.dry_run:
        return Outcome(f"{p.name_prefix}-*", None, "created", {"job": body})
    batch = client.BatchV1Api(ctx.kube())
    created = _call(batch.create_namespaced_job, p.namespace, body, _request_timeout=ctx.config.probe_timeout_seconds)
    return Outcome(created.metadata.name, None, "created", {"job": created.metadata.name})


# --------------------------------------------------------------------------- nodes


class NodeParams(Params):
    node: str = Field(min_length=1, max_length=253)


@action("cordon_node", NodeParams, lambda p: TargetRef("node", p.node))
def cordon_node(ctx: ActionContext, p: NodeParams) -> Outcome:
    """Mark a node unschedulable (what `kubectl cordon` does); never drains."""
    from kubernetes import client

    core = client.CoreV1Api(ctx.kube())
    timeout = ctx.config.probe_timeout_seconds
    node = _call(core.read_node, p.node, _request_timeout=timeout)
    before = bool(node.spec.unschedulable) if node.spec else False
    if ctx.dry_run or before:
        return Outcome(p.node, before, True)
    _call(core.patch_node, p.node, {"spec": {"unschedulable": True}}, _content_type=MERGE_PATCH, _request_timeout=timeout)
    after = _call(core.read_node, p.node, _request_timeout=timeout)
    if not (after.spec and after.spec.unschedulable):
        raise ActionFailed("the node still reports schedulable after the patch")
    return Outcome(p.node, before, True)


# --------------------------------------------------------------------------- PostgreSQL


class IdleConnectionsParams(Params):
    idle_seconds: float = Field(default=600, gt=0, description="terminate connections idle longer than this")
    application_names: list[str] = Field(default_factory=list, description="only these application_name values (empty: any)")
    users: list[str] = Field(default_factory=list, description="only these roles (empty: any)")
    max_connections: int = Field(default=50, ge=1, le=1000)


_IDLE_QUERY = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
      AND state = 'idle' AND state_change < now() - make_interval(secs => :idle)
      AND (cardinality(CAST(:apps AS text[])) = 0 OR application_name = ANY(CAST(:apps AS text[])))
      AND (cardinality(CAST(:users AS text[])) = 0 OR usename = ANY(CAST(:users AS text[])))
    ORDER BY state_change LIMIT :limit
"""


@action("terminate_idle_db_connections", IdleConnectionsParams, lambda p: TargetRef("database", "REMEDIATION_DB_DSN"))
def terminate_idle_db_connections(ctx: ActionContext, p: IdleConnectionsParams) -> Outcome:
    """pg_terminate_backend on connections idle longer than the threshold, in
    the database named by the REMEDIATION_DB_DSN secret."""
    import sqlalchemy as sa

    if ctx.config.remediation_db_dsn is None:
        raise NotConfigured("REMEDIATION_DB_DSN is not set")
    engine = _dsn_engine(ctx)
    params = {"idle": p.idle_seconds, "apps": p.application_names, "users": p.users, "limit": p.max_connections}
    try:
        with engine.connect() as conn:
            pids = list(conn.execute(sa.text(_IDLE_QUERY), params).scalars())
            terminated = 0
            if not ctx.dry_run:
                for pid in pids:
                    terminated += bool(conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar())
                conn.commit()
    except ActionFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - the database said no, or is unreachable
        raise ActionFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        engine.dispose()
    remaining = len(pids) - (len(pids) if ctx.dry_run else terminated)
    return Outcome("database", len(pids), remaining if not ctx.dry_run else 0, {"pids": pids, "terminated": 0 if ctx.dry_run else terminated})


def _dsn_engine(ctx: ActionContext):
    import sqlalchemy as sa

    from shared.config import parse_database_url
    from shared.db import split_unix_sock

    url, connect_args = split_unix_sock(parse_database_url(ctx.config.remediation_db_dsn.reveal(), "REMEDIATION_DB_DSN"))
    connect_args.update(timeout=ctx.config.probe_timeout_seconds * 3, application_name="incident-response-remediation")
    return sa.create_engine(url, connect_args=connect_args, poolclass=sa.pool.NullPool)


# --------------------------------------------------------------------------- humans


class EscalateParams(Params):
    reason: str = Field(default="this alert needs a human", max_length=500)


@action("escalate", EscalateParams, lambda p: TargetRef("human", "on-call"))
def escalate(ctx: ActionContext, p: EscalateParams) -> Outcome:
    """No change to the system: hand the incident to the on-call human."""
    return Outcome("on-call", None, None, {"reason": p.reason, "escalate": True})


def denied(target: TargetRef, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(str(target), pattern):
            return pattern
    return None

