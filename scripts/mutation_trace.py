"""A pytest plugin for scripts/mutation.py: records which test runs which
line of one module, and how long each test takes, so that a mutant of a
line runs only the tests that reach that line, fastest first.

    MUTATION_TRACE_MODULE=/abs/path/module.py MUTATION_TRACE_OUT=/abs/out.json \
        python -m pytest -p scripts.mutation_trace ...

A line tracer of our own (sys.settrace) rather than coverage.py: it needs
nothing installed, and it watches one file only, so every other frame costs
a single comparison. Threads started after the session starts are traced
too (group commit, the outbox's sender pool); a module that runs in another
process (a function started over HTTP) is not seen, so a target's tests
must exercise its module in the pytest process.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict

import pytest

TARGET = os.path.realpath(os.environ.get("MUTATION_TRACE_MODULE", ""))
OUT = os.environ.get("MUTATION_TRACE_OUT", "")
OUTSIDE = ""  # lines run outside any test (collection imports the module)

_context = OUTSIDE
_lines: dict[int, set[str]] = defaultdict(set)
_durations: dict[str, float] = {}
_files: dict[str, bool] = {}


def _local(frame, event, _arg):
    if event == "line":
        _lines[frame.f_lineno].add(_context)
    return _local


def _global(frame, _event, _arg):
    name = frame.f_code.co_filename
    mine = _files.get(name)
    if mine is None:
        mine = _files[name] = os.path.realpath(name) == TARGET
    if not mine:
        return None
    _lines[frame.f_lineno].add(_context)
    return _local


def pytest_configure(config):
    if TARGET and OUT:
        threading.settrace(_global)
        sys.settrace(_global)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _context
    _context = item.nodeid
    started = time.monotonic()
    try:
        yield
    finally:
        _durations[item.nodeid] = time.monotonic() - started
        _context = OUTSIDE


def pytest_unconfigure(config):
    if not (TARGET and OUT):
        return
    sys.settrace(None)
    threading.settrace(None)
    lines = {str(n): sorted(c) for n, c in sorted(_lines.items())}
    with open(OUT, "w") as out:
        json.dump({"module": TARGET, "lines": lines, "durations": _durations}, out, indent=0)
