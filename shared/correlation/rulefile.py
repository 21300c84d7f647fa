"""The correlation rules file, read and checked at the intake's start
without pydantic.

The rules' pydantic models (rules.py) are the definition of a valid file
and give the error a person reads; importing pydantic and building them
cost the intake's cold start more than the rest of its own start. A file
this module's plain checks find valid is one the models accept too (the
checks are narrower than the models: a value of an unusual type or shape is
left to them), so the start goes on without them; any other file is judged
by the models then, whose error stops the start as before. The models are
built from the checked file by the first request that correlates.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "functions" / "intake" / "correlation.yaml"
_DURATION = re.compile(r"^([0-9]+)(s|m|h)$")
_UNITS = {"s": 1, "m": 60, "h": 3600}
WORKLOAD = re.compile(r"^[a-z0-9][a-z0-9.-]*/(Deployment|StatefulSet|DaemonSet)/[a-z0-9][a-z0-9.-]*$")
# The models' Field patterns, as Python patterns over the whole value.
_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CorrelationConfigError(ValueError):
    """The rules file cannot be used; the message names file, rule and field."""


def seconds(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"must be a duration like 90s, 15m or 2h, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def label_sets_problem(value: list[dict[str, str]]) -> str | None:
    for matcher in value:
        if not matcher or not all(k.strip() and v.strip() for k, v in matcher.items()):
            return "every label set needs at least one label, each with a value"
    return None


def edges_problem(services, edges: dict[str, list[str]]) -> str | None:
    """What is wrong with a dependency rule's ``depends_on``, given the
    names under its ``services``."""
    for dependent, needs in edges.items():
        for name in [dependent, *needs]:
            if name not in services:
                return f"{dependent}: names {name!r}, which is not under services"
        if dependent in needs:
            return f"{dependent}: depends on itself"
    cycle = _cycle(edges)
    return "a cycle: " + " -> ".join(cycle) if cycle else None


def _cycle(edges: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> list[str] | None:
        if state.get(name) == 1:
            return path[path.index(name):] + [name]
        if state.get(name) == 2:
            return None
        state[name] = 1
        for need in edges.get(name, []):
            found = visit(need, path + [name])
            if found:
                return found
        state[name] = 2
        return None

    for start in sorted(edges):
        found = visit(start, [])
        if found:
            return found
    return None


def read(path: str = "") -> tuple[str, str]:
    """(text, source) of the rules file ``path`` names, or of the shipped one."""
    source = Path(path) if path else DEFAULT_FILE
    try:
        return source.read_text(), str(source)
    except OSError as exc:
        raise CorrelationConfigError(f"{source}: cannot read the correlation rules: {exc.strerror or exc}") from None


def mapping(text: str, source: str) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CorrelationConfigError(f"{source}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CorrelationConfigError(f"{source}: expected a mapping with 'rules'")
    return raw


class CheckedRules:
    """A rules file found valid; :meth:`model` is its RuleSet."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source
        self._model = None

    def model(self):
        if self._model is None:
            from shared.correlation import rules

            self._model = rules.validate(self.raw, self.source)
        return self._model


def check(path: str = "") -> CheckedRules:
    """The rules file ``path`` names (the shipped one if empty), refused
    with :class:`CorrelationConfigError` exactly as ``rules.load`` refuses it."""
    text, source = read(path)
    return checked(mapping(text, source), source)


def checked(raw: dict, source: str) -> CheckedRules:
    """``raw`` (a rules file's YAML mapping) found valid, or refused as the models refuse it."""
    rules = CheckedRules(raw, source)
    if not plainly_valid(raw):
        rules.model()  # the models' verdict, and their error
    return rules


# --------------------------------------------------------------------------- the plain checks
#
# Each returns True only for what the models accept; False means "let the
# models judge" (they may still accept it: a type they convert, say).

_COMMON = {"name", "window", "kind"}
_FIELDS = {
    "labels": _COMMON | {"labels", "alerts", "root"},
    "topology": _COMMON | {"scope", "root_alerts", "node_labels"},
    "dependency": _COMMON | {"services", "depends_on"},
}


def _text(value) -> bool:
    return type(value) is str


def _texts(value, least: int = 0, most: int | None = None) -> bool:
    return (type(value) is list and least <= len(value) and (most is None or len(value) <= most)
            and all(type(v) is str for v in value))


def plainly_valid(raw) -> bool:
    if type(raw) is not dict or set(raw) - {"rules"}:
        return False
    rules = raw.get("rules", [])
    if type(rules) is not list or not all(_rule(rule) for rule in rules):
        return False
    names = [rule["name"] for rule in rules]
    return len(set(names)) == len(names)


def _rule(rule) -> bool:
    if type(rule) is not dict:
        return False
    kind = rule.get("kind")
    if not _text(kind) or kind not in _FIELDS or set(rule) - _FIELDS[kind]:
        return False
    name = rule.get("name")
    if not _text(name) or len(name) > 60 or not _RULE_NAME.fullmatch(name):
        return False
    if "window" in rule and not _window(rule["window"]):
        return False
    if kind == "labels":
        return (_texts(rule.get("labels"), least=1) and _texts(rule.get("alerts", []))
                and _texts(rule.get("root", []), most=9))
    if kind == "topology":
        return (rule.get("scope") in ("node", "workload") and _text(rule["scope"])
                and _texts(rule.get("root_alerts"), least=1) and _texts(rule.get("node_labels", [])))
    return _dependency(rule)


def _window(value) -> bool:
    if not _text(value):
        return False
    try:
        return seconds(value) > 0
    except ValueError:
        return False


def _dependency(rule) -> bool:
    services, edges = rule.get("services"), rule.get("depends_on")
    if type(services) is not dict or not 1 <= len(services) <= 500:
        return False
    for name, service in services.items():
        if not _text(name) or not _SERVICE_NAME.fullmatch(name) or not _service(service):
            return False
    if type(edges) is not dict or not edges:
        return False
    if not all(_text(dependent) and _texts(needs) for dependent, needs in edges.items()):
        return False
    return edges_problem(services, edges) is None


def _service(service) -> bool:
    if type(service) is not dict or set(service) - {"workloads", "labels"}:
        return False
    workloads, label_sets = service.get("workloads", []), service.get("labels", [])
    if not _texts(workloads) or not all(WORKLOAD.match(w) for w in workloads):
        return False
    if type(label_sets) is not list:
        return False
    for matcher in label_sets:
        if type(matcher) is not dict or not all(_text(k) and _text(v) for k, v in matcher.items()):
            return False
    return label_sets_problem(label_sets) is None and bool(workloads or label_sets)
