"""What each alert of a batch offers to others and looks for, decided from
the rules before the intake's transaction.

A *key* names what relates alerts: ``node:<name>``, ``workload:<ns>/<Kind>/<name>``
or ``labels:<rule>:<values>``. An alert **provides** the keys it can be the
root of (a node alert provides its node) and **seeks** the keys whose root it
would join (a pod alert seeks its node and its workload, each with the
reason a person reads on the timeline). Labels rules make peers: the key is
both provided and sought. The rank orders roots: node over workload over
labels roots over anything else.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable

from shared.alerts import Alert
from shared.correlation.rules import RuleSet, TopologyRule
from shared.correlation.topology import Topology

log = logging.getLogger("correlation")

RANK_NODE = 30
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
    def __init__(self, rules: RuleSet, topology: Topology | None):
        self.rules = rules
        self.topology = topology
        self._node_roots = {name: r for r in rules.topology if r.scope == "node" for name in r.root_alerts}
        self._workload_roots = {name: r for r in rules.topology if r.scope == "workload" for name in r.root_alerts}
        self._topology_on: bool | None = None
        if rules.topology and (topology is None or not topology.configured()):
            # Said once, at start: only label rules (and `node` labels on alerts) apply.
            self._topology_on = False
            log.warning("Topology correlation rules have no Kubernetes API to read; only label rules apply",
                        extra={"rules": [r.name for r in rules.topology]})

    @property
    def topology_on(self) -> bool:
        if self._topology_on is None:
            self._topology_on = self.topology is not None and self.topology.available
            if not self._topology_on:
                log.warning("Topology correlation rules: the Kubernetes client could not be configured; only label rules apply")
        return self._topology_on

    @property
    def active(self) -> bool:
        return bool(self.rules.rules)

    def plan(self, alerts: Iterable[Alert]) -> dict[str, Links]:
        """Links per fingerprint, for the firing alerts some rule concerns."""
        result: dict[str, Links] = {}
        if not self.rules.rules:
            return result
        for alert in alerts:
            if alert.status != "firing" or alert.ignored_reason:
                continue
            links = Links()
            self._labels(alert, links)
            if self.rules.topology:
                self._topology(alert, links)
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
                links.rank = max(links.rank, RANK_LABELS_ROOT + len(rule.root) - rule.root.index(alert.alert_name))

    def _topology(self, alert: Alert, links: Links) -> None:
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
                links.rank = max(links.rank, RANK_NODE)
            return
        if name in self._workload_roots:
            rule = self._workload_roots[name]
            namespace = labels.get("namespace", "")
            for label, kind in WORKLOAD_LABELS.items():
                if labels.get(label) and namespace:
                    key = f"workload:{namespace}/{kind}/{labels[label]}"
                    links.provides[key] = f"{kind.lower()} {namespace}/{labels[label]}, where {name} fires"
                    links.seeks[key] = f"same {kind.lower()} {namespace}/{labels[label]}"
                    links.merge_window[key] = rule.window_seconds
                    links.rank = max(links.rank, RANK_WORKLOAD)
                    if self.topology_on and self._node_roots:
                        for node in sorted(self.topology.workload_nodes(namespace, kind, labels[label])):
                            links.seeks[f"node:{node}"] = f"{kind.lower()} {namespace}/{labels[label]} has pods on node {node}"
            return
        namespace, pod = labels.get("namespace", ""), labels.get("pod", "")
        if not (namespace and pod):
            return
        node = labels.get("node") or None
        workload = None
        if self.topology_on:
            placement = self.topology.placement(namespace, pod)
            if placement is not None:
                node = placement.node or node
                workload = placement.workload
        if node and self._node_roots:
            links.seeks[f"node:{node}"] = f"pod runs on node {node}"
        if workload and self._workload_roots:
            kind, owner = workload
            links.seeks[f"workload:{namespace}/{kind}/{owner}"] = f"pod belongs to {kind.lower()} {namespace}/{owner}"
