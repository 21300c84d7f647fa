"""The intake's start checks the correlation rules without pydantic
(shared/correlation/rulefile.py): a file those plain checks pass must be one
the rules' models accept, and every file gets the verdict and the error
``rules.parse`` gives."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.correlation import rulefile, rules
from tests.storms import dependency_rules

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    rulefile.DEFAULT_FILE.read_text(),
    (ROOT / "knative" / "base" / "config" / "correlation.yaml").read_text(),
    dependency_rules("shop"),
    "rules:\n  - {name: svc, kind: labels, labels: [namespace, service], alerts: [A, B], root: [A], window: 5m}\n",
    "rules: []\n",
    "",
]


@pytest.mark.parametrize("text", SHIPPED)
def test_the_rules_files_people_write_pass_without_the_models(text):
    raw = rulefile.mapping(text, "x")
    assert rulefile.plainly_valid(raw)
    assert rulefile.checked(raw, "x").model() == rules.parse(text, "x")


# Values a YAML file can hold, of every type the models meet, each right
# somewhere and wrong elsewhere.
ODD = [None, True, 0, 7, 1.5, "", " ", "x", "A", "a-b", "-a", "a" * 61, "a" * 60, "ok\n", "15m", "0s", "90s", "2h", "soon",
       " 5m ", "node", "workload", "labels", "topology", "dependency", "graph", b"bytes", [], ["x"], ["x", 1], [[]], ["a"] * 10,
       {}, {"x": "y"}, {"x": ""}, {"": "y"}, {1: "y"}, {"x": 1}, [{}], [{"job": "a"}], [{"job": " "}], ("x",), {"x"},
       ["a"] * 9, "shop/StatefulSet/db", "shop/Pod/db", ["shop/Deployment/app"], ["shop/Deployment/app\n"], ["shop/Pod/x"],
       {"workloads": ["a/Deployment/b"]}, {"labels": [{"job": "a"}]}, {"workloads": []}, {"other": 1},
       {"db": {"workloads": ["a/StatefulSet/db"]}}, {"db": ["db"]}, {"app": ["db"]}, {"db": []}, {"db": ["app"], "app": ["db"]}]
KEYS = ["name", "kind", "window", "labels", "alerts", "root", "scope", "root_alerts", "node_labels", "services", "depends_on",
        "workloads", "rules", "extra", "db", "app", "db.x", 1]


def _valid(rng: random.Random) -> dict:
    made = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["labels", "topology", "dependency"])
        # Few names: two rules of one name are refused.
        rule = {"name": rng.choice(["a", "b", "c-1", "d"]), "kind": kind}
        if rng.random() < 0.5:
            rule["window"] = rng.choice(["15m", "90s", "2h"])
        if kind == "labels":
            rule.update(labels=["namespace", "service"], alerts=["A"], root=["A"])
        elif kind == "topology":
            rule.update(scope=rng.choice(["node", "workload"]), root_alerts=["KubeNodeNotReady"], node_labels=["node"])
        else:
            rule.update(services={"db": {"workloads": ["shop/StatefulSet/db"], "labels": [{"job": "db"}]},
                                  "app": {"labels": [{"job": "app"}]}},
                        depends_on={"app": ["db"]})
        made.append(rule)
    return {"rules": made}


def _containers(value, found):
    if isinstance(value, dict):
        found.append(value)
        for v in value.values():
            _containers(v, found)
    elif isinstance(value, list):
        found.append(value)
        for v in value:
            _containers(v, found)
    return found


def _mutate(raw, rng: random.Random):
    value = copy.deepcopy(rng.choice(ODD))
    rules_ = [r for r in raw.get("rules") or [] if isinstance(r, dict)] if isinstance(raw.get("rules"), list) else []
    if rules_ and rng.random() < 0.3:
        # A field of a rule, where each value of ODD is tried in its place.
        rng.choice(rules_)[rng.choice(KEYS[:11])] = value
        return
    target = rng.choice(_containers(raw, []))
    if isinstance(target, dict):
        keys = list(target)
        choice = rng.random()
        if keys and choice < 0.45:
            target[rng.choice(keys)] = value
        elif keys and choice < 0.6:
            del target[rng.choice(keys)]
        elif choice < 0.8:
            target[rng.choice(KEYS)] = value
        elif keys:
            key = rng.choice(keys)
            target[rng.choice(KEYS)] = target.pop(key)
    elif target and rng.random() < 0.7:
        target[rng.randrange(len(target))] = value
    else:
        target.append(value)


def _verdict(call):
    try:
        call()
    except rules.CorrelationConfigError as exc:
        return str(exc)
    return "valid"


def _same_verdict(raw) -> bool:
    """Asserts the plain checks pass only what the models accept, and the
    check's verdict is the models'; whether the plain checks passed it."""
    expected = _verdict(lambda: rules.validate(copy.deepcopy(raw), "f.yaml"))
    plain = rulefile.plainly_valid(raw)
    if plain:
        assert expected == "valid", (raw, expected)
    assert _verdict(lambda: rulefile.checked(raw, "f.yaml")) == expected, raw
    return plain


def test_every_odd_value_in_every_field_of_each_kind_of_rule():
    rng = random.Random(1)
    bases = []
    while len(bases) < 3:
        raw = _valid(rng)
        kinds = {r["kind"] for r in raw["rules"]}
        if len(raw["rules"]) == 1 and not kinds & {b["rules"][0]["kind"] for b in bases}:
            bases.append(raw)
    for base in bases:
        for key in KEYS:
            for value in ODD:
                raw = copy.deepcopy(base)
                raw["rules"][0][key] = copy.deepcopy(value)
                _same_verdict(raw)
            raw = copy.deepcopy(base)
            raw["rules"][0].pop(key, None)
            _same_verdict(raw)


def test_a_file_the_plain_checks_pass_is_one_the_models_accept_and_every_verdict_is_the_models():
    rng = random.Random(20261129)
    passed = refused = 0
    for _ in range(6000):
        raw = _valid(rng)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            _mutate(raw, rng)
        if _same_verdict(raw):
            passed += 1
        else:
            refused += 1
    # The corpus exercises both sides.
    assert passed > 1000 and refused > 1000, (passed, refused)


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - {name: a, kind: labels, labels: []}\n", "rule 'a' (rules[0]), field labels: List should have at least 1 item"),
    ("rules: [\n", "not YAML"),
    ("- a\n", "expected a mapping with 'rules'"),
])
def test_a_bad_rules_file_still_stops_the_intake_at_start_with_the_models_error(tmp_path, base_env, text, message):
    path = tmp_path / "correlation.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-c", "import functions_framework\n"
                           "functions_framework.create_app('intake', 'functions/intake/main.py')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **base_env, "PYTHONPATH": str(ROOT), "CORRELATION_FILE": str(path)})
    assert done.returncode == 2
    with pytest.raises(rules.CorrelationConfigError) as expected:
        rules.load(str(path))
    assert done.stderr.strip().endswith(f"intake: configuration error: CORRELATION_FILE: {expected.value}".strip())
    assert message in str(expected.value)


def test_the_yaml_of_the_check_is_the_models_yaml():
    # Both read the file with PyYAML's safe loader: the same mapping.
    text = dependency_rules("shop")
    assert rulefile.mapping(text, "x") == yaml.safe_load(text)
