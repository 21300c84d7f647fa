"""The correlation rules as data: ``correlation.yaml`` (shipped next to the
intake) or the file ``CORRELATION_FILE`` names (a ConfigMap in Kubernetes).

Loading validates every rule; an error names the file, the rule and the
field, so a bad ConfigMap fails the start-up with one readable line. The
intake's start checks the file without these models (rulefile.py) and
builds them on its first request that correlates.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from shared.correlation.rulefile import (  # noqa: F401 - DEFAULT_FILE, seconds and the error are this module's API too
    DEFAULT_FILE,
    WORKLOAD,
    CorrelationConfigError,
    edges_problem,
    label_sets_problem,
    mapping,
    read,
    seconds,
)


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=60, pattern=r"^[a-z0-9][a-z0-9-]*$")
    window: str = "15m"

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        if seconds(value) <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @property
    def window_seconds(self) -> int:
        return seconds(self.window)


class LabelsRule(_Rule):
    """Alerts whose ``labels`` are all present and equal join one incident
    while its members keep firing within ``window``. ``alerts`` restricts the
    rule to these alert names (empty: any). ``root`` orders the alert names
    that should be the root, first is strongest; the rest rank below them."""

    kind: Literal["labels"]
    labels: list[str] = Field(min_length=1)
    alerts: list[str] = Field(default_factory=list)
    # At most nine: a labels root ranks below a workload root (plan.py).
    root: list[str] = Field(default_factory=list, max_length=9)


class TopologyRule(_Rule):
    """``scope: node``: the ``root_alerts`` (their node named by one of
    ``node_labels``) absorb the alerts of pods scheduled on that node.
    ``scope: workload``: the ``root_alerts`` (naming a Deployment,
    StatefulSet or DaemonSet by label) absorb the alerts of the workload's
    pods. A pod alert is any alert with ``namespace`` and ``pod`` labels.
    ``window``: how long before the root a pod's own incident may be merged
    into it."""

    kind: Literal["topology"]
    scope: Literal["node", "workload"]
    root_alerts: list[str] = Field(min_length=1)
    node_labels: list[str] = Field(default_factory=lambda: ["node", "instance"])


class Service(BaseModel):
    """How the alerts of one service of a ``dependency`` rule are known: by
    its workloads (``namespace/Kind/name``: the workload's own alerts and,
    through topology, its pods' alerts) and/or by label sets (an alert with
    every label of one set equal is about the service)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workloads: list[str] = Field(default_factory=list)
    labels: list[dict[str, str]] = Field(default_factory=list)

    @field_validator("workloads")
    @classmethod
    def _workloads(cls, value: list[str]) -> list[str]:
        for text in value:
            if not WORKLOAD.match(text):
                raise ValueError(f"{text!r} is not namespace/Kind/name with Kind Deployment, StatefulSet or DaemonSet")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        problem = label_sets_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _something(self) -> "Service":
        if not (self.workloads or self.labels):
            raise ValueError("names neither workloads nor labels, so no alert is about it")
        return self


class DependencyRule(_Rule):
    """Declared edges between services: ``depends_on`` maps a service to the
    services it needs, each described under ``services``. An alert about a
    dependency is the root over the alerts of its dependents (a database
    down over the applications that need it), and a dependent's alert joins
    the incident of its dependency's alert. ``window``: how long before the
    dependency's alert its dependents' own incidents may be merged into it."""

    kind: Literal["dependency"]
    services: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")], Service] = Field(min_length=1, max_length=500)
    depends_on: dict[str, list[str]] = Field(min_length=1)

    @field_validator("depends_on")
    @classmethod
    def _edges(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        services = info.data.get("services")
        if services is None:
            return value  # `services` failed already; that error is the one to read
        problem = edges_problem(services, value)
        if problem:
            raise ValueError(problem)
        return value

    def levels(self) -> dict[str, int]:
        """How many dependency steps lie below each service: 0 for a service
        nothing depends on, 1 for what those need, and so on. The root of an
        incident is the alert of the deepest dependency among its members."""
        dependents: dict[str, list[str]] = {}
        for dependent, needs in self.depends_on.items():
            for name in needs:
                dependents.setdefault(name, []).append(dependent)
        memo: dict[str, int] = {}

        def level(name: str) -> int:
            if name not in memo:
                memo[name] = 1 + max((level(d) for d in dependents[name]), default=-1) if name in dependents else 0
            return memo[name]

        return {name: level(name) for name in self.services}

    def needs(self, service: str) -> list[tuple[str, list[str]]]:
        """Every service ``service`` depends on, directly or not, each with
        the chain that leads to it (for the reason a person reads)."""
        found: dict[str, list[str]] = {}
        todo = [(service, [service])]
        while todo:
            name, chain = todo.pop(0)
            for need in self.depends_on.get(name, []):
                if need not in found:
                    found[need] = chain + [need]
                    todo.append((need, chain + [need]))
        return sorted(found.items())


Rule = Annotated[Union[LabelsRule, TopologyRule, DependencyRule], Field(discriminator="kind")]


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=list)

    @property
    def topology(self) -> list[TopologyRule]:
        return [r for r in self.rules if isinstance(r, TopologyRule)]

    @property
    def labels(self) -> list[LabelsRule]:
        return [r for r in self.rules if isinstance(r, LabelsRule)]

    @property
    def dependency(self) -> list[DependencyRule]:
        return [r for r in self.rules if isinstance(r, DependencyRule)]


def _where(error: dict, raw: dict) -> str:
    """``rule 'node-lost' (rules[0]), field window`` from a pydantic error location."""
    loc = list(error["loc"])
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        index = loc[1]
        rules = raw.get("rules") if isinstance(raw, dict) else None
        rule = rules[index] if isinstance(rules, list) and index < len(rules) else None
        name = rule.get("name") if isinstance(rule, dict) else None
        rest = loc[2:]
        # The discriminated union adds the kind to the path; it is not a field.
        if rest and rest[0] in ("labels", "topology", "dependency"):
            rest = rest[1:]
        field = ".".join(str(p) for p in rest) or "kind"
        return f"rule {name!r} (rules[{index}]), field {field}" if name else f"rules[{index}], field {field}"
    return "field " + (".".join(str(p) for p in loc) or "(top level)")


def parse(text: str, source: str) -> RuleSet:
    return validate(mapping(text, source), source)


def validate(raw: dict, source: str) -> RuleSet:
    """The rules of a file's YAML mapping ``raw``."""
    try:
        ruleset = RuleSet.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CorrelationConfigError(f"{source}: {_where(first, raw)}: {first['msg']}") from None
    names = [r.name for r in ruleset.rules]
    for name in names:
        if names.count(name) > 1:
            raise CorrelationConfigError(f"{source}: rule {name!r}, field name: defined twice")
    return ruleset


def load(path: str = "") -> RuleSet:
    return parse(*read(path))
