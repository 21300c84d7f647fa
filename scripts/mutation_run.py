"""The test command cosmic-ray runs for each mutant (scripts/mutation.py):
finds the lines the mutant changed, by comparing the module in the working
directory (a worker's copy, mutated in place) with the original, and runs
only the tests that reach those lines (scripts/mutation_trace.py), those
that killed most mutants so far first, then the fastest, stopping at the
first failure.

    python scripts/mutation_run.py /path/to/plan.json

Exit status: pytest's (non-zero: the mutant is killed). A mutant on a line
no test reaches exits 0 without running anything: it survives, reported as
*not covered*. A mutant of code that runs when the module is imported (a
constant, a default argument, a decorator) can affect every test, so it
runs them all; so does any doubt about the selection itself (it must never
kill a mutant: a test run that cannot find a selected test is run again
with every test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path

NOT_COVERED = "mutation-run: no test reaches the mutated lines"
# pytest's exit statuses that mean the selection was wrong, not the code:
# usage error (a node id not found) and no tests collected.
SELECTION_FAILED = (4, 5)


def changed_lines(original: list[str], mutated: list[str]) -> set[int]:
    """1-based numbers, in the original, of the lines the mutant changed."""
    lines: set[int] = set()
    for tag, i1, i2, _j1, _j2 in SequenceMatcher(None, original, mutated, autojunk=False).get_opcodes():
        if tag != "equal":
            lines.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    return lines


def ordered(plan: dict, tests) -> list[str]:
    """The tests that killed most of this module's mutants so far first (a
    mutant of a line is often killed by the test that killed its
    neighbour's), then the fastest."""
    kills = Counter(Path(plan["kills"]).read_text().splitlines()) if Path(plan["kills"]).exists() else Counter()
    durations = plan["durations"]
    return sorted(tests, key=lambda t: (-kills[t], durations.get(t, float("inf")), t))


def choose(plan: dict, mutated: list[str]) -> list[str]:
    """The tests to run, in order; [] for none."""
    original = Path(plan["original"]).read_text().splitlines()
    lines = changed_lines(original, mutated)
    if not lines or lines & set(plan["import_time"]):
        return ordered(plan, plan["durations"])
    reached: set[str] = set()
    for line in lines:
        # A statement over several lines may report only its first one.
        for candidate in {line, plan["statement_of"].get(str(line), line)}:
            reached.update(plan["lines"].get(str(candidate), []))
    if "" in reached:  # reached outside any test: no telling which tests depend on it
        return ordered(plan, plan["durations"])
    return ordered(plan, reached)


def pytest(args: list[str]) -> tuple[int, str]:
    """A pytest session: forked from the worker's server of preloaded
    libraries (scripts/mutation_forkserver.py) when there is one."""
    server = os.environ.get("MUTATION_FORKSERVER")
    if server:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(server)
                conn.sendall((json.dumps({"args": args}) + "\n").encode())
                answer = conn.makefile("r", errors="replace")
                status = int(answer.readline())
                output = answer.read()
            print(output, flush=True)
            return status, output
        except (OSError, ValueError) as exc:  # the server's fault, not the mutant's: a session of its own
            print(f"mutation-run: no answer from {server} ({exc}); running pytest itself", flush=True)
    done = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True, errors="replace")
    print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
    return done.returncode, done.stdout


def record_kill(plan: dict, output: str) -> None:
    """The test that failed (pytest's summary line ``FAILED <node id> - ...``)."""
    for line in output.splitlines():
        if line.startswith("FAILED "):
            with open(plan["kills"], "a") as kills:
                kills.write(line.removeprefix("FAILED ").split(" - ")[0].strip() + "\n")


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    options = [*plan["pytest"], f"--timeout={plan['test_timeout']}"]
    try:
        tests = choose(plan, Path(plan["module"]).read_text().splitlines())
    except Exception as exc:  # noqa: BLE001 - a fault of the selection: run everything
        print(f"mutation-run: selection failed ({type(exc).__name__}: {exc}); running every test", flush=True)
        return pytest([*options, *plan["all"]])[0]
    if not tests:
        print(NOT_COVERED, flush=True)
        return 0
    status, output = pytest([*options, *plan["options"], *tests])
    if status in SELECTION_FAILED:
        print(f"mutation-run: pytest could not run the selection ({status}); running every test", flush=True)
        status, output = pytest([*options, *plan["all"]])
    if status == 1:
        record_kill(plan, output)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
