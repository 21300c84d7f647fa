"""Playbooks are data: YAML mapping an alert (name plus label matchers) to an
ordered list of actions with parameters. Invalid playbooks are refused at
load with the file, the playbook and the field named.

The actions' parameters are checked against their pydantic models only
when paramcheck.py's plain checks cannot tell they are valid: a function's
start checks the usual file without importing pydantic or the actions, and
an invalid one gets the models' verdict and error as ever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from functions.remediation import paramcheck
from shared.diagnosis import VOCABULARY
from shared.templating import PLACEHOLDER, TemplateError, check_promql, lookup, render

DEFAULT_FILE = Path(__file__).with_name("playbooks.yaml")
MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")

# libyaml's safe loader (PyYAML's wheels include it): the pure-Python one
# took most of the start's check of this file.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class PlaybookError(ValueError):
    pass


class _AskTheModels(Exception):
    """The plain checks cannot tell: parse again with the actions' models."""


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str
    regex: re.Pattern | None = None

    def matches(self, labels: dict) -> bool:
        actual = labels.get(self.label, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        # Anchored, as in PromQL and AlertManager matchers.
        hit = self.regex.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True)
class Step:
    action: str
    params: dict
    approval: bool = False  # `approval: required` on the action


@dataclass(frozen=True)
class Verify:
    """What must hold after the actions: a PromQL expression that must return
    a result (become true), or the named alert no longer firing, within
    ``within_seconds``. ``promql`` and ``alert_stops_firing`` may use the
    same placeholders as parameters."""
    promql: str | None = None
    alert_stops_firing: str | None = None
    within_seconds: float | None = None


@dataclass(frozen=True)
class Playbook:
    name: str
    alertname: str | None  # None: any alert (only with a cause)
    matchers: tuple[Matcher, ...]
    steps: tuple[Step, ...]
    cause: str | None = None  # the diagnosis' most likely cause must be this one
    approval: bool = False  # `approval: required` on the playbook
    verify: Verify | None = None

    def needs_approval(self, mode: str) -> bool:
        return mode == "approve" or self.approval or any(s.approval for s in self.steps)

    def matches(self, alert_name: str, labels: dict, cause: str | None = None) -> bool:
        return ((self.alertname is None or alert_name == self.alertname) and all(m.matches(labels) for m in self.matchers)
                and (self.cause is None or cause == self.cause))


def _parse_matcher(raw: Any, where: str) -> Matcher:
    if not isinstance(raw, str) or not (m := MATCHER.match(raw)):
        raise PlaybookError(f"{where}: matcher {raw!r} is not label=value, label!=value, label=~regex or label!~regex")
    label, op, value = m.groups()
    value = value.strip("'\"")
    regex = None
    if op in ("=~", "!~"):
        try:
            regex = re.compile(value)
        except re.error as exc:
            raise PlaybookError(f"{where}: matcher {raw!r}: bad regex: {exc}") from None
    return Matcher(label, op, value, regex)


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return bool(PLACEHOLDER.search(value))
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    return False


def _validate_params(action: str, params: dict, where: str) -> None:
    from pydantic import TypeAdapter, ValidationError

    from functions.remediation.actions import REGISTRY

    model = REGISTRY[action].params
    fields = model.model_fields
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PlaybookError(f"{where}: field {unknown[0]!r}: unknown parameter of {action}; known: {', '.join(fields)}")
    for name, info in fields.items():
        if name not in params:
            if info.is_required():
                raise PlaybookError(f"{where}: field {name!r}: required by {action}")
            continue
        value = params[name]
        if _has_placeholder(value):
            continue  # checked when rendered against the incident
        try:
            TypeAdapter(info.annotation).validate_python(value)
        except ValidationError as exc:
            raise PlaybookError(f"{where}: field {name!r}: {exc.errors()[0]['msg']}") from None
    concrete = {k: v for k, v in params.items() if not _has_placeholder(v)}
    if len(concrete) == len(params):
        try:
            model.model_validate(concrete)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise PlaybookError(f"{where}: field {'.'.join(map(str, error['loc']))!r}: {error['msg']}") from None


def parse(spec: Any, source: str) -> list[Playbook]:
    try:
        return _parse(spec, source, plain=True)
    except _AskTheModels:
        return _parse(spec, source, plain=False)


def _known_actions(plain: bool) -> set[str]:
    if plain:
        return paramcheck.actions()
    from functions.remediation.actions import REGISTRY

    return set(REGISTRY)


def _parse(spec: Any, source: str, plain: bool) -> list[Playbook]:
    """``plain``: the parameters by paramcheck.py, and _AskTheModels where it
    cannot tell (before any later error, so that the models' pass raises the
    first error in the file, as it would alone)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("playbooks"), list):
        raise PlaybookError(f"{source}: expected a mapping with a 'playbooks' list")
    result = []
    names = set()
    for index, raw in enumerate(spec["playbooks"]):
        where = f"{source}: playbook #{index + 1}"
        if not isinstance(raw, dict):
            raise PlaybookError(f"{where}: must be a mapping")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise PlaybookError(f"{where}: field 'name': required")
        where = f"{source}: playbook {name!r}"
        if name in names:
            raise PlaybookError(f"{where}: field 'name': used twice")
        names.add(name)
        match = raw.get("match")
        if not isinstance(match, dict):
            raise PlaybookError(f"{where}: field 'match.alertname': required")
        cause = match.get("cause")
        if cause is not None and cause not in VOCABULARY:
            raise PlaybookError(f"{where}: field 'match.cause': unknown cause {cause!r}; known: {', '.join(VOCABULARY)}")
        if not isinstance(match.get("alertname"), str) and not (cause and "alertname" not in match):
            raise PlaybookError(f"{where}: field 'match.alertname': required (unless match.cause is given)")
        unknown = sorted(set(raw) - {"name", "match", "actions", "description", "approval", "verify"})
        if unknown:
            raise PlaybookError(f"{where}: field {unknown[0]!r}: unknown; allowed: name, description, match, actions, approval, verify")
        matchers = tuple(_parse_matcher(m, f"{where}: match.labels") for m in match.get("labels", []) or [])
        steps_raw = raw.get("actions")
        if not isinstance(steps_raw, list) or not steps_raw:
            raise PlaybookError(f"{where}: field 'actions': at least one action is required")
        steps = []
        for j, step in enumerate(steps_raw):
            at = f"{where}: actions[{j}]"
            if not isinstance(step, dict) or not isinstance(step.get("action"), str):
                raise PlaybookError(f"{at}: field 'action': required")
            known = _known_actions(plain)
            if step["action"] not in known:
                if plain:
                    raise _AskTheModels
                raise PlaybookError(f"{at}: field 'action': unknown action {step['action']!r}; known: {', '.join(sorted(known))}")
            params = step.get("params", {}) or {}
            if not isinstance(params, dict):
                raise PlaybookError(f"{at}: field 'params': must be a mapping")
            unknown = sorted(set(step) - {"action", "params", "approval"})
            if unknown:
                raise PlaybookError(f"{at}: field {unknown[0]!r}: unknown; allowed: action, params, approval")
            if not plain:
                _validate_params(step["action"], params, at)
            elif not paramcheck.plainly_valid(step["action"], params, {k for k, v in params.items() if not _has_placeholder(v)}):
                raise _AskTheModels
            steps.append(Step(step["action"], params, _approval(step.get("approval"), at)))
        result.append(Playbook(name, match.get("alertname"), matchers, tuple(steps), cause,
                               _approval(raw.get("approval"), where), _verify(raw.get("verify"), where)))
    return result


def _approval(raw: Any, where: str) -> bool:
    if raw is None or raw == "none":
        return False
    if raw == "required":
        return True
    raise PlaybookError(f"{where}: field 'approval': must be 'required' or 'none', got {raw!r}")


def _verify(raw: Any, where: str) -> Verify | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PlaybookError(f"{where}: field 'verify': must be a mapping with promql or alert_stops_firing")
    unknown = sorted(set(raw) - {"promql", "alert_stops_firing", "within_seconds"})
    if unknown:
        raise PlaybookError(f"{where}: field 'verify.{unknown[0]}': unknown; allowed: promql, alert_stops_firing, within_seconds")
    promql, alert = raw.get("promql"), raw.get("alert_stops_firing")
    if (promql is None) == (alert is None):
        raise PlaybookError(f"{where}: field 'verify': exactly one of promql and alert_stops_firing is required")
    for key, value in (("promql", promql), ("alert_stops_firing", alert)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PlaybookError(f"{where}: field 'verify.{key}': must be a non-empty string")
    if promql is not None:
        try:
            check_promql(promql)
        except TemplateError as exc:
            raise PlaybookError(f"{where}: field 'verify.promql': {exc}") from None
    within = raw.get("within_seconds")
    if within is not None and (isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 < within <= 3600):
        raise PlaybookError(f"{where}: field 'verify.within_seconds': must be a number of seconds from 1 to 3600")
    return Verify(promql, alert, float(within) if within is not None else None)


def load(path: str = "") -> list[Playbook]:
    source = Path(path) if path else DEFAULT_FILE
    try:
        spec = yaml.load(source.read_text(), Loader=SAFE_LOADER)
    except OSError as exc:
        raise PlaybookError(f"{source}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlaybookError(f"{source}: not valid YAML: {exc}") from None
    return parse(spec, str(source))


def find(playbooks: list[Playbook], alert_name: str, labels: dict, cause: str | None = None) -> Playbook | None:
    """The first playbook that matches: put specific ones before general ones.
    ``cause`` is the diagnosis' most likely cause, for playbooks that name one."""
    return next((p for p in playbooks if p.matches(alert_name, labels, cause)), None)


def render_params(value: Any, context: dict) -> Any:
    """Fill placeholders; a value that is exactly one placeholder keeps the
    placeholder's type (so ``replicas: "{{ labels.replicas }}"`` can be an int
    after validation)."""
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return lookup(context, whole.group(1))
        return render(value, context)
    if isinstance(value, dict):
        return {k: render_params(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_params(v, context) for v in value]
    return value


__all__ = ["Playbook", "PlaybookError", "Step", "Verify", "TemplateError", "find", "load", "parse", "render_params"]
