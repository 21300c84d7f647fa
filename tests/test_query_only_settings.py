"""The board's sign-in settings (LOGIN_*, TRUSTED_PROXY_HOPS) are the query
function's alone, but sit in the ConfigMap every function reads: a wrong
one stops the query, naming the variable, and no other function (a typo
there must not take paging down). The others start, warned, and read the
default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from loopback.processes import ROOT, FunctionProcess
from shared.config import ConfigError, load_settings
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook

BASE = {"DATABASE_URL": "postgresql+pg8000://postgres@127.0.0.1:5432/app"}
WRONG = {
    "LOGIN_MAX_FAILURES": ("x", "LOGIN_MAX_FAILURES: expected a whole number, got 'x'", 5),
    "LOGIN_MAX_FAILURES_TOTAL": ("0", "LOGIN_MAX_FAILURES_TOTAL: must be between 1 and 100000, got 0", 50),
    "LOGIN_FAILURE_WINDOW_SECONDS": ("5m", "LOGIN_FAILURE_WINDOW_SECONDS: expected a whole number, got '5m'", 300),
    "TRUSTED_PROXY_HOPS": ("11", "TRUSTED_PROXY_HOPS: must be between 0 and 10, got 11", 0),
}
OTHERS = ("intake", "diagnostics", "remediation", "escalation", "deadletter")


@pytest.mark.parametrize("name", WRONG)
@pytest.mark.parametrize("target", ["query", ""])
def test_the_query_refuses_a_wrong_sign_in_setting_naming_it(name, target):
    raw, message, _ = WRONG[name]
    with pytest.raises(ConfigError) as refused:
        load_settings({**BASE, "FUNCTION_TARGET": target, name: raw})
    assert str(refused.value) == message


@pytest.mark.parametrize("name", WRONG)
@pytest.mark.parametrize("target", OTHERS)
def test_any_other_function_reads_a_wrong_sign_in_setting_as_its_default_and_says_so(name, target, caplog):
    raw, message, default = WRONG[name]
    with caplog.at_level("WARNING", logger="config"):
        config = load_settings({**BASE, "FUNCTION_TARGET": target, name: raw})
    assert getattr(config, name.lower()) == default
    warned = [r for r in caplog.records if r.name == "config"]
    assert [r.getMessage().split(":")[0] for r in warned] == [f"{name} ignored here"]
    assert warned[0].error == message


def test_a_right_value_is_read_by_every_function():
    for target in ("query", *OTHERS):
        config = load_settings({**BASE, "FUNCTION_TARGET": target, "LOGIN_MAX_FAILURES": "7", "TRUSTED_PROXY_HOPS": "2"})
        assert (config.login_max_failures, config.trusted_proxy_hops) == (7, 2)


def _create_app(name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import functions_framework\n"
                           f"functions_framework.create_app('{name}', 'functions/{name}/main.py')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT), "FUNCTION_TARGET": name})


def test_wrong_sign_in_settings_in_the_shared_config_map_stop_the_query_and_no_other_function(base_env):
    shared_config_map = {**base_env, **{name: raw for name, (raw, _, _) in WRONG.items()}}
    for name in OTHERS:
        started = _create_app(name, shared_config_map)
        assert started.returncode == 0, f"{name}: {started.stderr[-2000:]}"
        assert "LOGIN_MAX_FAILURES ignored here" in started.stderr and "TRUSTED_PROXY_HOPS ignored here" in started.stderr
    query = _create_app("query", shared_config_map)
    assert query.returncode == 2
    assert query.stderr.strip().endswith("query: configuration error: LOGIN_MAX_FAILURES: expected a whole number, got 'x'")
    query = _create_app("query", {**base_env, "TRUSTED_PROXY_HOPS": "-1"})
    assert query.returncode == 2
    assert query.stderr.strip().endswith("query: configuration error: TRUSTED_PROXY_HOPS: must be between 0 and 10, got -1")


def test_the_intake_served_with_a_wrong_trusted_proxy_hops_takes_alerts(base_env, clean_db):
    """The server reads TRUSTED_PROXY_HOPS too (shared/serve.py), after the
    function's start: it must read it as that start did, not fail on it."""
    proc = FunctionProcess("intake", {**base_env, "TRUSTED_PROXY_HOPS": "two", "LOGIN_MAX_FAILURES": "0"}).start()
    try:
        stored = requests.post(proc.url + "/webhook/alert", json=webhook([raw_alert("ProxyHopsTypo")]),
                               headers={"Authorization": f"Bearer {TEST_TOKEN}", "X-Forwarded-For": "203.0.113.5"},
                               timeout=30)
        assert stored.status_code == 200, stored.text
        assert "Traceback" not in proc.logs()
    finally:
        proc.stop()
