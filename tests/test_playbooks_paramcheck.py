"""The remediation's start checks the playbooks' action parameters without
pydantic (functions/remediation/paramcheck.py): its description of the
models is theirs, what it passes the models accept, and every playbooks
file gets the verdict and the error the models give."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from functions.remediation import paramcheck
from functions.remediation import playbooks as pb

ROOT = Path(__file__).resolve().parent.parent
FILES = [pb.DEFAULT_FILE, ROOT / "knative" / "base" / "config" / "playbooks.yaml"]


def test_the_description_of_the_parameters_is_the_models():
    # After changing a model: python -m functions.remediation.paramcheck
    assert json.loads(paramcheck.SCHEMA_FILE.read_text()) == paramcheck.describe()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.parent.name)
def test_the_shipped_playbooks_pass_without_the_models_and_read_the_same(path):
    spec = yaml.safe_load(path.read_text())
    assert pb._parse(copy.deepcopy(spec), "x", plain=True) == pb._parse(copy.deepcopy(spec), "x", plain=False)


ODD = [None, True, False, 0, 1, -1, 6, 9, 10, 100, 101, 1000, 1001, 2**53, 2**53 + 1, 10**400, 0.5, 1.0, 6.0, 3600.0, 604800,
       604801, float("inf"), float("nan"), -0.0, "", " ", "x", "6", "email-service", "a" * 40, "a" * 41, "a" * 63, "a" * 64,
       "a" * 253, "a" * 254, "a" * 500, "a" * 501, "log-cleanup", "-bad", "bad-", "ok\n", "é", "{{ namespace }}",
       "job-name={{ labels.job_name }}", "app=x", "app!=x", "app=", "a,,b", b"bytes", [], ["x"], ["*"], ["x", 1], [None],
       ("x",), {}, {"a": 1}, {"backoffLimit": 1, "image": "{{ node }}"}, {"x"}]


def _verdict(call):
    try:
        return call()
    except pb.PlaybookError as exc:
        return str(exc)


def _book(action: str, params: dict) -> dict:
    return {"playbooks": [{"name": "p", "match": {"alertname": "A"}, "actions": [{"action": action, "params": params}]}]}


def _same_verdict(spec) -> None:
    by_models = _verdict(lambda: pb._parse(copy.deepcopy(spec), "f.yaml", plain=False))
    assert _verdict(lambda: pb.parse(copy.deepcopy(spec), "f.yaml")) == by_models, spec
    for book in spec["playbooks"]:
        for step in book["actions"]:
            params = step.get("params") or {}
            concrete = {k for k, v in params.items() if not pb._has_placeholder(v)}
            if paramcheck.plainly_valid(step["action"], params, concrete):
                pb._validate_params(step["action"], params, "f.yaml")  # raises if the models refuse


def _valid_params() -> dict:
    return {
        "scale_deployment": {"namespace": "{{ namespace }}", "name": "email-service", "replicas": 6},
        "rollout_restart": {"namespace": "prod", "name": "email-service"},
        "rollback_deployment": {"namespace": "prod", "name": "api", "to_revision": 3, "rolled_out_within_seconds": 3600},
        "delete_pods": {"namespace": "prod", "pod": "{{ labels.pod }}", "reasons": ["CrashLoopBackOff"], "max_pods": 1},
        "run_job": {"namespace": "ops", "name_prefix": "log-cleanup", "template": {"backoffLimit": 1}},
        "cordon_node": {"node": "n1"},
        "terminate_idle_db_connections": {"idle_seconds": 600, "application_names": ["a"], "users": [], "max_connections": 100},
        "escalate": {"reason": "a human"},
    }


def test_every_odd_value_in_every_parameter_of_every_action():
    described = paramcheck.schema()
    for action, params in _valid_params().items():
        _same_verdict(_book(action, params))
        for field in [*described[action]["fields"], "extra"]:
            for value in ODD:
                _same_verdict(_book(action, {**params, field: copy.deepcopy(value)}))
            _same_verdict(_book(action, {k: v for k, v in params.items() if k != field}))
            # Every other parameter concrete: the whole model is judged.
            concrete = {k: v for k, v in params.items() if not pb._has_placeholder(v)}
            for value in ODD:
                _same_verdict(_book(action, {**concrete, field: copy.deepcopy(value)}))


def test_random_playbooks_get_the_models_verdict():
    rng = random.Random(20261129)
    valid = _valid_params()
    names = sorted(valid) + ["nope"]
    for _ in range(1500):
        books = []
        for i in range(rng.randint(1, 3)):
            steps = []
            for _ in range(rng.randint(1, 2)):
                action = rng.choice(names)
                params = copy.deepcopy(valid.get(action, {}))
                for _ in range(rng.choice([0, 1, 2])):
                    keys = list(params) or ["x"]
                    params[rng.choice(keys + ["extra"])] = copy.deepcopy(rng.choice(ODD))
                steps.append({"action": action, "params": params})
            books.append({"name": f"p{i % 2}" if rng.random() < 0.1 else f"p{i}", "match": {"alertname": "A"}, "actions": steps})
        _same_verdict({"playbooks": books})


@pytest.mark.parametrize("params, message", [
    ({"namespace": "prod", "name": "api", "replicas": "many"}, "field 'replicas': Input should be a valid integer"),
    ({"namespace": "prod", "name": "api", "replicas": 5000}, "field 'replicas': Input should be less than or equal to 1000"),
])
def test_bad_parameters_still_stop_the_remediation_at_start_with_the_models_error(tmp_path, base_env, params, message):
    path = tmp_path / "playbooks.yaml"
    path.write_text(yaml.safe_dump(_book("scale_deployment", params)))
    done = subprocess.run([sys.executable, "-c", "import functions_framework\n"
                           "functions_framework.create_app('remediation', 'functions/remediation/main.py')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **base_env, "PYTHONPATH": str(ROOT), "PLAYBOOKS_FILE": str(path)})
    assert done.returncode == 2
    with pytest.raises(pb.PlaybookError) as expected:
        pb._parse(yaml.safe_load(path.read_text()), str(path), plain=False)
    assert done.stderr.strip().endswith(f"remediation: configuration error: PLAYBOOKS_FILE: {expected.value}")
    assert message in str(expected.value)
