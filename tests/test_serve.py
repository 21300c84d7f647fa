"""The image's entry point (shared/serve.py) without its two variables: one
line naming what is missing, no traceback, exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("given, absent", [
    ({}, ["FUNCTION_SOURCE", "FUNCTION_TARGET"]),
    ({"FUNCTION_SOURCE": "functions/intake/main.py"}, ["FUNCTION_TARGET"]),
    ({"FUNCTION_TARGET": "intake", "FUNCTION_SOURCE": "  "}, ["FUNCTION_SOURCE"]),
])
def test_a_missing_function_variable_is_named_in_one_line(given, absent):
    env = {k: v for k, v in os.environ.items() if k not in ("FUNCTION_SOURCE", "FUNCTION_TARGET")}
    env.update(given, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "shared.serve"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(name in lines[0] for name in absent)
    assert all(name not in lines[0].split("(")[0] for name in {"FUNCTION_SOURCE", "FUNCTION_TARGET"} - set(absent))
