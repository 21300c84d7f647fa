"""The test harness cleans up after itself: a function process that fails to
start is terminated and its log removed, and one a test body leaves running
is stopped when the test ends."""

from __future__ import annotations

import json

import pytest

from loopback import processes
from loopback.processes import FunctionProcess


def test_a_process_that_exits_at_start_leaves_no_log(base_env, tmp_path):
    bad = tmp_path / "playbooks.yaml"
    bad.write_text(json.dumps({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "nope"}]}]}))
    proc = FunctionProcess("remediation", {**base_env, "PLAYBOOKS_FILE": str(bad)}, threads=1)
    with pytest.raises(processes.ProcessExited, match="unknown action 'nope'"):
        proc.start(timeout=20)
    assert not proc.log_path.exists() and not proc.running
    assert proc not in processes.RUNNING


def test_a_process_that_is_not_ready_in_time_is_terminated(base_env):
    proc = FunctionProcess("query", dict(base_env), threads=1)
    with pytest.raises(AssertionError, match="timed out") as err:
        proc.start(timeout=0.01)
    assert "query log" in str(err.value)
    assert proc.process.poll() is not None and not proc.log_path.exists()


def test_processes_a_test_body_leaves_running_are_stopped_when_it_ends(base_env):
    processes.leave_test_body()  # this test plays the hook itself
    processes.enter_test_body()
    try:
        leaked = FunctionProcess("deadletter", dict(base_env), threads=1).start()
        assert leaked.running
    finally:
        names = processes.leave_test_body()
        processes.enter_test_body()
    assert names == ["deadletter"] and not leaked.running and not leaked.log_path.exists()
