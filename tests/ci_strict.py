"""Under ``CI=true`` a skipped test is a failed test: a skip there means a
dependency (Chromium, amtool, Prometheus...) is missing from the CI image,
and a suite that quietly skips its browser test proves nothing about the
board. On a developer's machine skips stay skips.

Loaded by tests/conftest.py (and usable alone: ``pytest -p tests.ci_strict``)."""

from __future__ import annotations

import os

import pytest


def strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where a missing dependency is a failure, not a skip: {_reason(report)}"
    return report
