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

A fixture wider than a function (module, session) is set up inside the
first test that uses it; the lines its setup reaches are given to every
test that uses it, since each of them, run alone, sets it up and depends
on it.
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
FIXTURE = "fixture:"  # a context while a wider fixture is set up: "fixture:<baseid>::<name>"

_context = OUTSIDE
_lines: dict[int, set[str]] = defaultdict(set)
_durations: dict[str, float] = {}
_files: dict[str, bool] = {}
_fixtures_of: dict[str, list[str]] = {}  # each test's fixture names


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
def pytest_fixture_setup(fixturedef, request):
    global _context
    if fixturedef.scope == "function":
        yield
        return
    saved = _context
    _context = f"{FIXTURE}{fixturedef.baseid}::{fixturedef.argname}"
    try:
        yield
    finally:
        _context = saved


def _users(context: str) -> list[str]:
    """The tests that use the fixture a FIXTURE context names (defined at
    ``baseid``: a test under that node id, with the fixture's name)."""
    baseid, name = context.removeprefix(FIXTURE).rsplit("::", 1)
    return [t for t, names in _fixtures_of.items() if t.startswith(baseid) and name in names]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _context
    _context = item.nodeid
    _fixtures_of[item.nodeid] = list(getattr(item, "fixturenames", []))
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
    lines = {}
    for n, contexts in sorted(_lines.items()):
        tests = {c for c in contexts if not c.startswith(FIXTURE)}
        for c in contexts - tests:
            tests.update(_users(c) or [OUTSIDE])  # no user known: every test
        lines[str(n)] = sorted(tests)
    with open(OUT, "w") as out:
        json.dump({"module": TARGET, "lines": lines, "durations": _durations}, out, indent=0)
