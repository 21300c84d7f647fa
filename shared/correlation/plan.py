"""What each alert of a batch offers to others and looks for, decided from
the rules before the intake's transaction.

A *key* names what relates alerts: ``node:<name>``, ``workload:<ns>/<Kind>/<name>``,
``dependency:<rule>:<service>`` or ``labels:<rule>:<values>``. An alert
**provides** the keys it can be the root of (a node alert provides its node)
and **seeks** the keys whose root it would join (a pod alert seeks its node
and its workload, each with the reason a person reads on the timeline).
Labels rules make peers: the key is both provided and sought. The rank
orders roots (:func:`rank` below): node over everything on it, then the
deepest dependency over its dependents, then workload over labels roots
over anything else (a pod).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from shared.alerts import Alert

if TYPE_CHECKING:  # the rules' pydantic models are the intake's; annotations only here
    from shared.correlation.rules import DependencyRule, RuleSet, TopologyRule

log = logging.getLogger("correlation")

# A node alert outranks everything that runs on the node; each dependency
# level adds RANK_DEPENDENCY, more than any workload or labels rank, so a
# database's pod outranks the Deployment that needs the database; within a
# level, workload over a labels rule's root list (at most nine names) over a
# pod. Levels are bounded by the rule's 500 services, far below RANK_NODE.
RANK_NODE = 1_000_000
RANK_DEPENDENCY = 100
RANK_WORKLOAD = 20
RANK_LABELS_ROOT = 10  # plus the position in the rule's root list
WORKLOAD_LABELS = {"deployment": "Deployment", "statefulset": "StatefulSet", "daemonset": "DaemonSet"}
_PORT = re.compile(r":[0-9]+$")


@dataclass
class Links:
    rank: int = 0
    provides: dict[str, str] = field(default_factory=dict)  # key -> what the root is, for reasons
    seeks: dict[str, str] = field(default_factory=dict)  # key -> why this alert belongs to that root
    join_window: dict[str, int] = field(default_factory=dict)  # key -> seconds (labels keys only)
    merge_window: dict[str, int] = field(default_factory=dict)  # provided key -> seconds a late root reaches back
    rank_reason: str = ""  # why it ranks where it does, for a take-over's reason

    def outrank(self, rank: int, reason: str) -> None:
        if rank > self.rank:
            self.rank, self.rank_reason = rank, reason

    def __bool__(self) -> bool:
        return bool(self.provides or self.seeks)


def subject(alert: Alert) -> str:
    """How the timeline names an alert: its name and what it is about."""
    labels = alert.labels
    if labels.get("pod"):
        what = f"{labels.get('namespace', '')}/{labels['pod']}".lstrip("/")
    elif any(labels.get(k) for k in WORKLOAD_LABELS):
        name = next(labels[k] for k in WORKLOAD_LABELS if labels.get(k))
        what = f"{labels.get('namespace', '')}/{name}".lstrip("/")
    else:
        what = labels.get("node") or labels.get("instance") or labels.get("service") or labels.get("namespace") or ""
    return f"{alert.alert_name} {what}".strip()


class Correlator:
    """``topology``: shared.correlation.topology's Sources (or one source):
    ``configured()``, ``available``, ``placement()``, ``workload_nodes()``."""

    def __init__(self, rules: RuleSet, topology=None):
        self.rules = rules
        self.topology = topology
        self._node_roots = {name: r for r in rules.topology if r.scope == "node" for name in r.root_alerts}
        self._workload_roots = {name: r for r in rules.topology if r.scope == "workload" for name in r.root_alerts}
        self._dependencies = [_Dependencies(r) for r in rules.dependency]
        # A pod's placement is looked up only when a rule can use it.
        self._placing = bool(self._node_roots or self._workload_roots or any(d.by_workload for d in self._dependencies))
        self._topology_on: bool | None = None
        if self._placing and (topology is None or not topology.configured()):
            # Said once, at start: only label rules (and `node` labels on alerts) apply.
            self._topology_on = False
            log.warning("Topology correlation rules have neither a Kubernetes API nor kube-state-metrics "
                        "(PROMETHEUS_URL) to read; only label rules apply",
                        extra={"rules": [r.name for r in rules.topology + rules.dependency]})

    @property
    def topology_on(self) -> bool:
        if self._topology_on is None:
            self._topology_on = self.topology is not None and self.topology.available
            if not self._topology_on:
                log.warning("Topology correlation rules: no topology source could be configured; only label rules apply")
        return self._topology_on

    @property
    def active(self) -> bool:
        return bool(self.rules.rules)

    def plan(self, alerts: Iterable[Alert], fetch: bool = True) -> dict[str, Links]:
        """Links per fingerprint, for the firing alerts some rule concerns.
        ``fetch=False``: topology only from what is cached (no network call;
        inside a transaction)."""
        result: dict[str, Links] = {}
        if not self.rules.rules:
            return result
        for alert in alerts:
            if alert.status != "firing" or alert.ignored_reason:
                continue
            links = Links()
            self._labels(alert, links)
            workload = None
            if self.rules.topology or self._dependencies:
                workload = self._topology(alert, links, fetch)
            for rule in self._dependencies:
                rule.link(alert, workload, links)
            _drop_oversized_keys(alert, links)
            if links:
                result[alert.fingerprint] = links
        return result

    def _labels(self, alert: Alert, links: Links) -> None:
        for rule in self.rules.labels:
            if rule.alerts and alert.alert_name not in rule.alerts:
                continue
            values = [alert.labels.get(name, "") for name in rule.labels]
            if not all(v.strip() for v in values):
                continue
            key = f"labels:{rule.name}:" + "|".join(values)
            same = ", ".join(f"{n}={v}" for n, v in zip(rule.labels, values, strict=True))
            links.provides[key] = f"rule {rule.name}: {same}"
            links.seeks[key] = f"same {same}"
            links.join_window[key] = rule.window_seconds
            links.merge_window[key] = 0  # peers never merge incidents, they join the first
            if alert.alert_name in rule.root:
                position = rule.root.index(alert.alert_name)
                links.outrank(RANK_LABELS_ROOT + len(rule.root) - position,
                              f"{alert.alert_name} is {_ordinal(position)} in rule {rule.name}'s root list")

    def _topology(self, alert: Alert, links: Links, fetch: bool) -> tuple[str, str, str] | None:
        """Node and workload keys; returns the workload the alert is about
        (namespace, kind, name), its own or its pod's, for dependency rules."""
        labels = alert.labels
        name = alert.alert_name
        if name in self._node_roots:
            rule: TopologyRule = self._node_roots[name]
            node = next((_PORT.sub("", labels[k]) for k in rule.node_labels if labels.get(k)), None)
            if node:
                key = f"node:{node}"
                links.provides[key] = f"node {node}, where {name} fires"
                # Another alert of the same node joins the first one's incident.
                links.seeks[key] = f"same node {node}"
                links.merge_window[key] = rule.window_seconds
                links.outrank(RANK_NODE, f"a node alert ({node})")
            return None
        namespace = labels.get("namespace", "")
        own = next(((kind, labels[label]) for label, kind in WORKLOAD_LABELS.items() if labels.get(label)), None)
        if name in self._workload_roots:
            rule = self._workload_roots[name]
            namespace = labels.get("namespace", "")
            for label, kind in WORKLOAD_LABELS.items():
                if labels.get(label) and namespace:
                    key = f"workload:{namespace}/{kind}/{labels[label]}"
                    links.provides[key] = f"{kind.lower()} {namespace}/{labels[label]}, where {name} fires"
                    links.seeks[key] = f"same {kind.lower()} {namespace}/{labels[label]}"
                    links.merge_window[key] = rule.window_seconds
                    links.outrank(RANK_WORKLOAD, f"a workload alert ({kind.lower()} {namespace}/{labels[label]})")
                    if self.topology_on and self._node_roots:
                        for node in sorted(self.topology.workload_nodes(namespace, kind, labels[label], fetch)):
                            links.seeks[f"node:{node}"] = f"{kind.lower()} {namespace}/{labels[label]} has pods on node {node}"
            return (namespace, *own) if own and namespace else None
        pod = labels.get("pod", "")
        if not (namespace and pod):
            return (namespace, *own) if own and namespace else None
        node = labels.get("node") or None
        workload = None
        if self._placing and self.topology_on:
            placement = self.topology.placement(namespace, pod, fetch)
            if placement is not None:
                node = placement.node or node
                workload = placement.workload
        if node and self._node_roots:
            links.seeks[f"node:{node}"] = f"pod runs on node {node}"
        if workload and self._workload_roots:
            kind, owner = workload
            links.seeks[f"workload:{namespace}/{kind}/{owner}"] = f"pod belongs to {kind.lower()} {namespace}/{owner}"
        return (namespace, *workload) if workload else None


# Keys are entries of GIN indexes on incident_members, whose entries hold at
# most 2712 bytes: a longer one failed the alert's whole transaction, and
# the sender retried it forever. No Kubernetes name comes near this bound
# (a workload key is at most ~340 characters); what passes it is a label no
# object can have, so the alert is stored without that key.
KEY_MAX_BYTES = 1024


def _drop_oversized_keys(alert: Alert, links: Links) -> None:
    oversized = [key for key in {*links.provides, *links.seeks} if len(key.encode("utf-8")) > KEY_MAX_BYTES]
    for key in oversized:
        for table in (links.provides, links.seeks, links.join_window, links.merge_window):
            table.pop(key, None)
    if oversized:
        log.warning("Correlation keys over the size bound dropped", extra={
            "alert_name": alert.alert_name, "fingerprint": alert.fingerprint, "keys": len(oversized), "max_bytes": KEY_MAX_BYTES})


def _ordinal(position: int) -> str:
    return ["first", "second", "third"][position] if position < 3 else f"number {position + 1}"


class _Dependencies:
    """A dependency rule, ready to say which services an alert is about."""

    def __init__(self, rule: DependencyRule):
        self.rule = rule
        self.levels = rule.levels()
        self.needs = {name: rule.needs(name) for name in rule.services}
        self.by_workload = {w: name for name, s in rule.services.items() for w in s.workloads}
        self.dependents: dict[str, list[str]] = {}
        for dependent, needs in rule.depends_on.items():
            for need in needs:
                self.dependents.setdefault(need, []).append(dependent)

    def about(self, alert: Alert, workload: tuple[str, str, str] | None) -> list[str]:
        names = set()
        if workload is not None:
            name = self.by_workload.get("/".join(workload))
            if name:
                names.add(name)
        for name, service in self.rule.services.items():
            if any(all(alert.labels.get(k) == v for k, v in matcher.items()) for matcher in service.labels):
                names.add(name)
        return sorted(names)

    def link(self, alert: Alert, workload: tuple[str, str, str] | None, links: Links) -> None:
        rule = self.rule
        base, base_reason = links.rank, links.rank_reason
        for name in self.about(alert, workload):
            if name in self.dependents:
                key = f"dependency:{rule.name}:{name}"
                needed_by = ", ".join(sorted(self.dependents[name]))
                links.provides[key] = f"{name}, on which {needed_by} depend"
                # Another alert of the same service joins the first one's incident.
                links.seeks[key] = f"same service {name}"
                links.merge_window[key] = rule.window_seconds
                if self.levels[name]:
                    why = f"{name} is a dependency of {needed_by} (rule {rule.name})"
                    links.outrank(base + RANK_DEPENDENCY * self.levels[name],
                                  f"{base_reason}, and {why}" if base else why)
            for need, chain in self.needs[name]:
                key = f"dependency:{rule.name}:{need}"
                links.seeks.setdefault(key, " depends on ".join(chain[:2]) + "".join(f", which depends on {n}" for n in chain[2:]))
