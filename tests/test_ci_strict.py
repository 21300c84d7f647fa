"""Under CI=true a skip (a missing binary) fails the run; elsewhere it stays
a skip. Runs a small suite in a child pytest with the plugin."""

from __future__ import annotations

import os
import subprocess
import sys

from loopback.processes import ROOT

SUITE = '''
import pytest

@pytest.mark.skipif(True, reason="needs chromium")
def test_browser():
    pass

@pytest.mark.xfail(strict=True, reason="known")
def test_known_bug():
    assert False

def test_plain():
    pass
'''


def run(tmp_path, ci: str | None):
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_strict", "-p", "no:cacheprovider", "-c", os.devnull, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )


def test_a_skip_fails_under_ci(tmp_path):
    result = run(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    # skipif skips during setup, so pytest counts the failed setup as an error.
    assert "1 passed, 1 xfailed, 1 error" in result.stdout
    assert "missing dependency is a failure" in result.stdout and "needs chromium" in result.stdout


def test_a_skip_stays_a_skip_elsewhere(tmp_path):
    for ci in (None, "false"):
        result = run(tmp_path, ci)
        assert result.returncode == 0, result.stdout
        assert "1 passed, 1 skipped, 1 xfailed" in result.stdout
