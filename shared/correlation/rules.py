"""The correlation rules as data: ``correlation.yaml`` (shipped next to the
intake) or the file ``CORRELATION_FILE`` names (a ConfigMap in Kubernetes).

Loading validates every rule; an error names the file, the rule and the
field, so a bad ConfigMap fails the start-up with one readable line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "functions" / "intake" / "correlation.yaml"
_DURATION = re.compile(r"^([0-9]+)(s|m|h)$")
_UNITS = {"s": 1, "m": 60, "h": 3600}


class CorrelationConfigError(ValueError):
    """The rules file cannot be used; the message names file, rule and field."""


def seconds(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"must be a duration like 90s, 15m or 2h, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


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
    root: list[str] = Field(default_factory=list)


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


Rule = Annotated[Union[LabelsRule, TopologyRule], Field(discriminator="kind")]


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=list)

    @property
    def topology(self) -> list[TopologyRule]:
        return [r for r in self.rules if isinstance(r, TopologyRule)]

    @property
    def labels(self) -> list[LabelsRule]:
        return [r for r in self.rules if isinstance(r, LabelsRule)]


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
        if rest and rest[0] in ("labels", "topology"):
            rest = rest[1:]
        field = ".".join(str(p) for p in rest) or "kind"
        return f"rule {name!r} (rules[{index}]), field {field}" if name else f"rules[{index}], field {field}"
    return "field " + (".".join(str(p) for p in loc) or "(top level)")


def parse(text: str, source: str) -> RuleSet:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CorrelationConfigError(f"{source}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CorrelationConfigError(f"{source}: expected a mapping with 'rules'")
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
    source = Path(path) if path else DEFAULT_FILE
    try:
        text = source.read_text()
    except OSError as exc:
        raise CorrelationConfigError(f"{source}: cannot read the correlation rules: {exc.strerror or exc}") from None
    return parse(text, str(source))
