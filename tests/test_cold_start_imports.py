"""A cold start imports only what its first answer needs.

A function's process (shared/serve.py) imports its ``main.py`` as it
starts, and the first request of a new instance is ``GET /health``, which
opens a database connection and nothing else: Knative's readiness probe
passes after that much. Each function is started here in a fresh
interpreter the way functions-framework builds its app, and the
modules present are read after the import, after ``/health`` and after the
first other request (docs/benchmarks.md, cold start and resident memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imported by no function's main.py, nor by /health: what the handlers need.
# pydantic too: the intake's correlation rules and the remediation's
# playbooks are checked at start without their models (rulefile.py,
# paramcheck.py), which the first request builds.
HEAVY = ("requests", "kubernetes.client", "prometheus_client", "jinja2.sandbox", "pydantic")
# Each function's own handler module and a request that is not /health.
FUNCTIONS = {
    "intake": ("functions.intake.handlers", "POST", "/webhook/alert"),
    "query": ("functions.query.api", "GET", "/incidents"),
    "diagnostics": ("functions.diagnostics.handler", "POST", "/"),
    "remediation": ("functions.remediation.handler", "POST", "/"),
    "escalation": ("functions.escalation.handler", "POST", "/"),
    "deadletter": ("functions.deadletter.handler", "POST", "/"),
}
# Not even the first other request loads these where that function has no
# use for them on it: recording alerts (shared.ingest, with the correlation
# rules' pydantic models and YAML) is the intake's alone, and requests is
# loaded by whatever sends (the publisher's drainer, a redelivery, a silence,
# a page), not by a request that only reads or writes the database.
NOT_ON_FIRST_REQUEST = {
    "intake": ("requests",),
    "query": ("requests", "shared.ingest", "pydantic"),
    "diagnostics": ("requests", "shared.ingest", "pydantic", "kubernetes.client"),
    "remediation": ("requests", "shared.ingest"),
    "escalation": ("shared.ingest", "pydantic"),
    "deadletter": ("requests", "shared.ingest", "pydantic", "yaml"),
}

# Each function's own modules that its start does without: the models of
# the intake's rules, the remediation's actions, the diagnostics' collector.
NOT_BEFORE_HEALTH = {
    "intake": ("shared.correlation.rules",),
    "remediation": ("functions.remediation.actions",),
    "diagnostics": ("functions.diagnostics.collector",),
}

PROBE = """
import json, sys
import functions_framework

name, method, path, watched = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
present = lambda: [m for m in watched if m in sys.modules]
app = functions_framework.create_app(name, f"functions/{name}/main.py")
seen = {"imported": present()}
client = app.test_client()
seen["health"] = client.get("/health").status_code
seen["after health"] = present()
seen["other"] = client.open(path, method=method).status_code
seen["after another request"] = present()
print(json.dumps(seen))
"""


def modules_seen(name: str, env: dict) -> dict:
    handler, method, path = FUNCTIONS[name]
    watched = [*dict.fromkeys([*HEAVY, *NOT_ON_FIRST_REQUEST[name], *NOT_BEFORE_HEALTH.get(name, ()), "sqlalchemy", "pg8000", handler])]
    done = subprocess.run([sys.executable, "-c", PROBE, name, method, path, json.dumps(watched)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_function_imports_its_handlers_on_the_first_request_that_needs_them(name, base_env):
    handler = FUNCTIONS[name][0]
    seen = modules_seen(name, base_env)
    # main.py: settings, config files, routing.
    assert seen["imported"] == []
    # /health: a database connection, through pg8000 alone (shared/dbcheck.py).
    assert seen["health"] == 200
    assert seen["after health"] == ["pg8000"]
    # Any other request builds the routes: the handler module comes in then.
    assert seen["other"] < 500 and handler in seen["after another request"]
    assert not set(NOT_ON_FIRST_REQUEST[name]) & set(seen["after another request"])


# The checks a start runs on a function's config file, each alone.
START_CHECKS = {
    "correlation rules": "from shared.correlation import rulefile\nrulefile.check()",
    "playbooks": "from functions.remediation import playbooks\nplaybooks.load()",
}


@pytest.mark.parametrize("check", START_CHECKS)
def test_a_config_file_is_checked_at_start_without_pydantic(check):
    done = subprocess.run([sys.executable, "-c", f"import sys\n{START_CHECKS[check]}\nprint('pydantic' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


KUBE_PROBE = """
import json, sys
from shared import kube

kube.api_client()
loaded = sorted(m for m in ("kubernetes.config.kube_config", "requests", "oauthlib", "yaml") if m in sys.modules)
from kubernetes import config  # the documented import still works, its loaders on first use

print(json.dumps({"reason": kube.not_configured_reason(), "loaded": loaded, "public": callable(config.load_kube_config)}))
"""


def test_a_pod_reads_its_service_account_without_the_kubeconfig_loader_and_its_dependencies():
    # The in-cluster path; the service account files are absent here, so the configuration fails, loudly.
    done = subprocess.run([sys.executable, "-c", KUBE_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "KUBERNETES_SERVICE_HOST": "10.0.0.1",
                               "KUBERNETES_SERVICE_PORT": "443", "LOG_LEVEL": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["reason"].startswith("configuration failed") and "token" in seen["reason"]
    assert seen["loaded"] == [] and seen["public"]
