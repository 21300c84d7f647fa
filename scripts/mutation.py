"""Mutation testing of the modules where a wrong line costs the most, with
cosmic-ray. Each module's fast tests run once unmutated under a line tracer
(scripts/mutation_trace.py); then each mutant runs only the tests that reach
the lines it changed, fastest first, until one fails (scripts/mutation_run.py),
two mutants at a time, each worker in a copy of the tree of its own (the
working tree is never mutated) with its own database and a fork server of
preloaded libraries (scripts/mutation_forkserver.py). Writes the score and
every surviving mutant to docs/mutation.md.

    make mutation                                  # every module below
    make mutation MODULES="rails batching"         # some of them (by short name)

The per-module results are kept in docs/mutation-results.json, so a partial
run updates its modules and keeps the others' last measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "docs" / "mutation-results.json"
REPORT = ROOT / "docs" / "mutation.md"
NOTES = ROOT / "docs" / "mutation-notes.md"
TIMEOUT_SECONDS = 120
# `**` in a dict display or a call is unpacking, not a power: parso still
# offers it to the binary-operator mutations, which can only make syntax
# errors. Replacing an operator by a power, modulo, floor division, shift or
# bitwise and/xor is left out too: in this code (strings, counts, seconds)
# such a mutant dies of a TypeError or an absurd value at once, and each
# costs a full test run; +, -, *, / and | swaps among themselves remain.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_Pow_.*",
    r"core/ReplaceBinaryOperator_.*_(Pow|Mod|FloorDiv|RShift|LShift|BitAnd|BitXor)$",
]
# Two test sessions at once on this 2-core machine: each mutant's run is
# mostly start-up and waiting on PostgreSQL and loopback servers, so a second
# worker nearly halves the wall time. MUTATION_WORKERS=1 runs one at a time.
WORKERS = int(os.environ.get("MUTATION_WORKERS", "2"))
PYTEST = "-m pytest -x -q -p no:cacheprovider -p pytest_timeout"
ANNOTATION_REASON = "in an annotation that is never evaluated (from __future__ import annotations)"


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    tests: str  # pytest arguments: the fast tests that concern this module


TARGETS = [
    Target("rails", "functions/remediation/rails.py", "tests/test_rails.py"),
    Target("actions", "functions/remediation/actions.py", "--noconftest tests/test_actions.py tests/test_rollback.py "
           "tests/test_remediation_selectors.py::test_parameters_that_would_select_a_whole_namespace_are_refused "
           "tests/test_remediation_selectors.py::test_narrow_parameters_are_accepted "
           "tests/test_remediation_selectors.py::test_a_refused_selector_says_why"),
    Target("batching", "functions/intake/batching.py", "tests/test_group_commit_slices.py tests/test_group_commit.py "
           "tests/test_group_commit_fairness.py"),
    Target("delivery", "functions/escalation/delivery.py", "--noconftest tests/test_delivery.py"),
    Target("errors", "shared/errors.py", "tests/test_http_dispatch.py"),
    Target("http", "shared/http.py", "tests/test_http_dispatch.py tests/test_http_errors_app.py tests/test_http_limits.py "
           "tests/test_schema_revision.py::test_any_functions_undefined_function_is_503_only_while_the_schema_is_older "
           "tests/test_schema_revision.py::test_the_intake_before_its_migration_answers_503_and_is_not_ready_then_serves_once_migrated"),
    Target("claims", "shared/claims.py", "tests/test_claims.py"),
    Target("log", "shared/log.py", "--noconftest tests/test_log_format.py"),
    Target("outbox", "shared/outbox.py", "tests/test_outbox_publish.py "
           "tests/test_event_publishing.py::test_failed_attempts_back_off_so_due_rows_go_first "
           "tests/test_event_publishing.py::test_the_lease_is_short_for_the_default_timeout"),
    Target("escalation", "functions/escalation/handler.py", "tests/test_escalation_handler.py"),
]


def _database_url(env: dict, name: str) -> str | None:
    from urllib.parse import urlsplit, urlunsplit

    from shared.config import parse_database_url

    raw = env.get("TEST_DATABASE_URL")
    return urlunsplit(urlsplit(parse_database_url(raw))._replace(path="/" + name)) if raw else None


def migrated_template(work: Path, env: dict) -> str | None:
    """One migrated database that every test session copies (tests/conftest.py,
    TEST_DATABASE_TEMPLATE) instead of running the migrations again: per
    mutant that saves seconds, most of a database module's run."""
    from shared import db

    admin = _database_url(env, "postgres")
    if admin is None:
        return None
    name = f"mutation_template_{os.getpid()}"
    db.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}"')
    db.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    url = _database_url(env, name)
    # In a process of its own, so no pooled connection stays open on the
    # template (PostgreSQL refuses to copy a database in use).
    run([str(BIN / "python"), "-c", f"from shared import migrate; migrate.upgrade({url!r})"], work / "tree", env)
    env["TEST_DATABASE_TEMPLATE"] = name
    return name


def drop_database(name: str, env: dict) -> None:
    from shared import db

    db.run_outside_transaction(_database_url(env, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def worker_databases(template: str | None, env: dict, count: int) -> list[str]:
    """A copy of the template for each worker, which every test session of
    that worker uses (tests/conftest.py, TEST_DATABASE_NAME) instead of
    creating and dropping one of its own: a second or more of each mutant's
    start-up. One worker runs one session at a time, and clean_db empties
    the tables before each test that writes."""
    from shared import db

    if template is None:
        return []
    names = [f"{template}_w{i}" for i in range(max(1, count))]
    for name in names:
        db.run_outside_transaction(_database_url(env, "postgres"), f'DROP DATABASE IF EXISTS "{name}"')
        db.run_outside_transaction(_database_url(env, "postgres"), f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return names


# `cosmic-ray http-worker` listens on every interface; this one on loopback only.
WORKER = """
from aiohttp import web
from cosmic_ray.distribution.http import handle_mutate_and_test
app = web.Application()
app.add_routes([web.post("/", handle_mutate_and_test)])
web.run_app(app, host="127.0.0.1", port={port}, print=None)
"""


class Workers:
    """cosmic-ray's http workers, each in a copy of the tree of its own (a
    worker mutates the module in place), fed by the http distributor; with
    one worker, cosmic-ray's local distributor in the tree itself. Each
    worker has a database of its own (two mutants never share one) and a
    fork server of preloaded libraries (scripts/mutation_forkserver.py)
    that starts its test sessions."""

    def __init__(self, work: Path, env: dict, count: int, databases: list[str]):
        import socket

        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.sockets: list[Path] = []
        self.slots: list[tuple[Path, dict]] = []  # each worker's tree and environment
        self.local_env: dict = {}  # for the local distributor
        for i in range(max(1, count)):
            copy = work / f"worker-{i}" if count > 1 else work / "tree"
            if count > 1:
                shutil.copytree(work / "tree", copy, symlinks=True)
            own = {**env, "PYTHONPATH": str(copy), **({"TEST_DATABASE_NAME": databases[i]} if databases else {})}
            sock = work / f"fork-{i}.sock"
            log = (work / f"worker-{i}.log").open("w")
            self.processes.append(subprocess.Popen(
                [str(BIN / "python"), str(copy / "scripts" / "mutation_forkserver.py"), str(sock), str(TIMEOUT_SECONDS)],
                cwd=copy, env=own, stdout=log, stderr=subprocess.STDOUT))
            self.sockets.append(sock)
            own["MUTATION_FORKSERVER"] = str(sock)
            self.slots.append((copy, own))
            if count == 1:
                self.local_env = {k: own[k] for k in ("TEST_DATABASE_NAME", "MUTATION_FORKSERVER") if k in own}
                continue
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.processes.append(subprocess.Popen([str(BIN / "python"), "-c", WORKER.format(port=port)], cwd=copy,
                                                   env=own, stdout=log, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(self.urls, self.processes[1::2], strict=True):
            self._wait(url, process)
        deadline = time.monotonic() + 60
        while not all(s.exists() for s in self.sockets):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise SystemExit(f"mutation: a fork server did not start (see {work}/worker-*.log)")
            time.sleep(0.1)

    def check(self, plan: Path) -> None:
        """The unmutated module must pass every test the way each mutant is
        run (the runner, the worker's fork server, its database with what
        earlier sessions left in it), or the mutants' deaths mean nothing."""
        checks = [subprocess.Popen([str(BIN / "python"), "scripts/mutation_run.py", str(plan)], cwd=copy, env=own,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for copy, own in self.slots]
        for (copy, _), check in zip(self.slots, checks, strict=True):
            output = check.communicate()[0]
            if check.returncode != 0:
                raise SystemExit(f"mutation: the unmutated module fails as the worker in {copy} runs it:\n{output[-3000:]}")

    @staticmethod
    def _wait(url: str, process: subprocess.Popen) -> None:
        import socket

        host, port = url.removeprefix("http://").split(":")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"mutation: the worker at {url} did not start")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def copy_tree() -> Path:
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "test-artifacts", ".run", "mutation-*")
    shutil.copytree(ROOT, work / "tree", ignore=ignore, symlinks=True)
    os.symlink(os.path.realpath(ROOT / ".venv"), work / "tree" / ".venv")
    return work


def run(cmd: list[str], cwd: Path, env: dict, check=True, capture=True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=capture)
    if check and result.returncode != 0:
        raise SystemExit(f"mutation: {' '.join(cmd)} failed ({result.returncode}):\n{(result.stdout or '')[-3000:]}\n{(result.stderr or '')[-3000:]}")
    return result


def config_text(target: Target, workers: list[str], plan: Path) -> str:
    # Relative paths: each worker mutates and tests the copy it runs in.
    test_command = f"{BIN / 'python'} scripts/mutation_run.py {plan}"
    distributor = ['name = "http"', "", "[cosmic-ray.distributor.http]", f"worker-urls = {json.dumps(workers)}"] \
        if workers else ['name = "local"']
    return "\n".join([
        "[cosmic-ray]",
        f'module-path = "{target.module}"',
        f"timeout = {TIMEOUT_SECONDS}.0",
        "excluded-modules = []",
        f"test-command = {json.dumps(test_command)}",
        "",
        "[cosmic-ray.distributor]",
        *distributor,
        "",
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}",
        "",
    ])


def measure(work: Path, target: Target, env: dict, workers: Workers, database: str | None) -> dict:
    tree = work / "tree"
    config = work / f"{target.name}.toml"
    session = work / f"{target.name}.sqlite"
    started = time.monotonic()
    # One run of the selection, unmutated, records which test reaches which
    # line (scripts/mutation_trace.py). It must pass, or every mutant "dies";
    # run a second time on the same database, it must pass with what the
    # first left behind, as each worker's sessions do.
    local = {**env, "TEST_DATABASE_NAME": database} if database else env
    trace = work / f"{target.name}.trace.json"
    run([str(BIN / "python"), *PYTEST.split(), "-p", "scripts.mutation_trace", *_split(target.tests)], tree,
        {**local, "MUTATION_TRACE_MODULE": str(tree / target.module), "MUTATION_TRACE_OUT": str(trace)})
    plan = write_plan(work, target, json.loads(trace.read_text()))
    workers.check(plan)
    config.write_text(config_text(target, workers.urls, plan))
    run([str(BIN / "cosmic-ray"), "init", str(config), str(session)], tree, env)
    run([str(BIN / "cr-filter-operators"), str(session), str(config)], tree, env)
    skip_annotations(session, tree / target.module)
    run([str(BIN / "cosmic-ray"), "exec", str(config), str(session)], tree, {**env, **workers.local_env}, capture=False)
    dump = run([str(BIN / "cosmic-ray"), "dump", str(session)], tree, env).stdout
    return summarise(target, dump, tree, time.monotonic() - started)


def write_plan(work: Path, target: Target, trace: dict) -> Path:
    """What scripts/mutation_run.py needs to pick each mutant's tests: the
    original module, which tests reached each line and how long each took,
    the lines that run at import, and each line's statement."""
    source = (work / "tree" / target.module).read_text()
    original = work / f"{target.name}.original.py"
    original.write_text(source)
    import_time, statement_of = module_lines(source)
    reached = {line for line, tests in trace["lines"].items() if any(tests)}
    print(f"mutation: {target.module}: {len(reached)} lines reached by {len(trace['durations'])} tests",
          file=sys.stderr, flush=True)
    plan = work / f"{target.name}.plan.json"
    plan.write_text(json.dumps({
        "module": target.module, "original": str(original), "lines": trace["lines"], "durations": trace["durations"],
        "import_time": sorted(import_time), "statement_of": {str(k): v for k, v in statement_of.items()},
        "pytest": PYTEST.split()[2:], "all": _split(target.tests), "kills": str(work / f"{target.name}.kills"),
        "options": [a for a in _split(target.tests) if a.startswith("-")],
        "test_timeout": test_timeout(trace["durations"]),
    }))
    return plan


def test_timeout(durations: dict[str, float]) -> int:
    """Each test's limit in a mutant's run (pytest-timeout): a mutant that
    makes a loop endless fails its test after this instead of holding the
    worker until cosmic-ray's TIMEOUT_SECONDS. Five times the slowest test of
    the unmutated run, at least 20 s, so a slow moment of the machine does
    not fail a test; the check run (Workers.check) runs under it too."""
    return max(20, round(5 * max(durations.values(), default=0)))


def module_lines(source: str) -> tuple[set[int], dict[int, int]]:
    """The lines outside every function body (they run when the module is
    imported, or, in a lambda, wherever it is called: either way no single
    test owns them), and for every line the first line of the innermost
    statement around it (a tracer may report a statement over several lines
    by its first)."""
    import ast

    tree = ast.parse(source)
    count = len(source.splitlines())
    in_body: set[int] = set()
    statement_of: dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_body.update(range(node.body[0].lineno, node.end_lineno + 1))
        if isinstance(node, ast.stmt):
            for line in range(node.lineno, node.end_lineno + 1):
                statement_of[line] = max(statement_of.get(line, 0), node.lineno)
    return set(range(1, count + 1)) - in_body, statement_of


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the module's annotations are that Python never evaluates: with
    ``from __future__ import annotations`` a signature's annotations and a
    dataclass field's stay strings, and a local variable's are never even
    kept. A mutant there (``str | None`` -> ``str + None``) cannot change
    behaviour, so it is not run. Annotations of other classes (a pydantic
    model evaluates its own) are left to the tests."""
    import ast

    tree = ast.parse(source)
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                 for n in tree.body)
    if not future:
        return []
    nodes: list[ast.expr] = []

    def dataclass(cls: ast.ClassDef) -> bool:
        names = [d.func if isinstance(d, ast.Call) else d for d in cls.decorator_list]
        return any((isinstance(d, ast.Name) and d.id == "dataclass") or (isinstance(d, ast.Attribute) and d.attr == "dataclass")
                   for d in names)

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, *(a for a in (args.vararg, args.kwarg) if a)]
            nodes += [a.annotation for a in every if a.annotation is not None]
            if not isinstance(node, ast.Lambda):
                if node.returns is not None:
                    nodes.append(node.returns)
                nodes += [s.annotation for s in ast.walk(node) if isinstance(s, ast.AnnAssign)]
        elif isinstance(node, ast.ClassDef) and dataclass(node):
            nodes += [s.annotation for s in node.body if isinstance(s, ast.AnnAssign)]
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes]


def skip_annotations(session: Path, module: Path) -> None:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(module.read_text())
    with use_db(str(session)) as db:
        for item in db.pending_work_items:  # not those an operator filter already left out
            inside = [any(start <= tuple(m.start_pos) and tuple(m.end_pos) <= end for start, end in spans) for m in item.mutations]
            if all(inside):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=ANNOTATION_REASON))


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args)


def summarise(target: Target, dump: str, tree: Path, seconds: float) -> dict:
    from mutation_run import NOT_COVERED  # scripts/, the directory of this script

    killed = survived = skipped = incompetent = timeouts = annotations = uncovered = 0
    survivors = []
    source = (tree / target.module).read_text().splitlines()
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("worker_outcome") == "skipped":
            skipped += 1
            annotations += result is not None and result.get("output") == ANNOTATION_REASON
            continue
        outcome = result.get("test_outcome")
        if result.get("worker_outcome") == "timeout":
            timeouts += 1
        if outcome == "survived":
            survived += 1
            reached = NOT_COVERED not in (result.get("output") or "")
            uncovered += not reached
            mutation = item["mutations"][0]
            row = mutation["start_pos"][0]
            survivors.append({
                "line": row,
                "operator": mutation["operator_name"],
                "occurrence": mutation["occurrence"],
                "code": source[row - 1].strip() if row <= len(source) else "",
                "diff": _diff_lines(result.get("diff") or ""),
                "covered": reached,
            })
        elif outcome == "incompetent":
            incompetent += 1
        else:
            killed += 1
    tested = killed + survived + incompetent
    return {
        "module": target.module, "tests": target.tests, "mutants": tested, "killed": killed + incompetent,
        "incompetent": incompetent, "timeouts": timeouts, "survived": survived, "uncovered": uncovered, "skipped": skipped, "annotations": annotations,
        "score": round(100.0 * (killed + incompetent) / tested, 1) if tested else None,
        "seconds": round(seconds), "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "survivors": sorted(survivors, key=lambda s: (s["line"], s["operator"])),
    }


def _diff_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _minutes(seconds: int) -> str:
    return f"{seconds // 60} min {seconds % 60:02d} s"


def write_report(results: dict) -> None:
    order = [t.name for t in TARGETS]
    rows = [results[n] for n in order if n in results]
    total_mutants = sum(r["mutants"] for r in rows)
    total_killed = sum(r["killed"] for r in rows)
    lines = [
        "# Mutation testing",
        "",
        "Measured with cosmic-ray (pinned in requirements-dev.txt) by `make mutation` (scripts/mutation.py; method in",
        "docs/mutation-notes.md). Each module's fast tests (column *tests*) run once unmutated under a line tracer",
        "(scripts/mutation_trace.py) that records which test reaches which line; then each mutant runs only the tests",
        "that reach the lines it changed, fastest first, stopping at the first failure (scripts/mutation_run.py), two",
        "mutants at a time, each worker in a copy of the tree of its own (`MUTATION_WORKERS`). A mutant of code that",
        "runs at import (constants, default arguments, decorators) runs every test of the module. A mutant is *killed*",
        "only when a test fails (or the mutated module cannot even be imported: *incompetent*, counted as killed); a",
        "mutant on a line no test reaches runs nothing and *survives* (column *not reached*, a subset of *survived*).",
        "Left out: `**` unpacking taken for a power, and swaps to power, modulo, floor division, shifts and bitwise",
        "and/xor (they only make type errors; see the script); and mutants inside annotations Python never evaluates",
        "(`from __future__ import annotations`: a signature's, a dataclass field's, a local variable's), which cannot",
        "change behaviour (column *annotations*).",
        "",
        "| module | mutants | killed | survived | not reached | score | timeouts | annotations | run time | measured | tests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r.get('uncovered', '-')} | {r['score']} % | {r['timeouts']} | "
                     f"{r.get('annotations', '-')} | {_minutes(r['seconds'])} | {r['measured_at']} | `{r['tests']}` |")
    if total_mutants:
        lines.append(f"| **all measured** | {total_mutants} | {total_killed} | {total_mutants - total_killed} | | "
                     f"**{100.0 * total_killed / total_mutants:.1f} %** | | | {_minutes(sum(r['seconds'] for r in rows))} | | |")
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    lines += ["", "## Surviving mutants", "",
              "Line numbers are those of the file as the run measured it (column *measured*), not necessarily today's.", ""]
    for r in rows:
        lines.append(f"### `{r['module']}` ({r['survived']})")
        lines.append("")
        if not r["survivors"]:
            lines += ["None.", ""]
            continue
        for s in r["survivors"]:
            change = " / ".join(d.strip() for d in s["diff"][:2]) or s["code"]
            reach = "" if s.get("covered", True) else " (not reached by any test)"
            lines.append(f"- line {s['line']}, `{s['operator'].removeprefix('core/')}`{reach}: `{change[:200]}`")
        lines.append("")
    REPORT.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str]) -> None:
    wanted = argv or [t.name for t in TARGETS]
    unknown = set(wanted) - {t.name for t in TARGETS}
    if unknown:
        raise SystemExit(f"mutation: unknown module(s) {sorted(unknown)}; known: {[t.name for t in TARGETS]}")
    import signal

    # Stopped (SIGTERM, or SIGINT in the background where it is ignored by
    # default): still stop the workers, drop the template and the copies.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda number, _frame: sys.exit(128 + number))
    work = copy_tree()
    # Stale bytecode could hide a mutant of the same size written in the same
    # second; the plugins installed for other tools (schemathesis, ...) would
    # triple each run's start-up.
    env = {**os.environ, "PYTHONPATH": str(work / "tree"), "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    template = migrated_template(work, env)
    databases = worker_databases(template, env, WORKERS)
    workers = Workers(work, env, WORKERS, databases)
    try:
        for target in TARGETS:
            if target.name not in wanted:
                continue
            print(f"mutation: {target.module} with {target.tests}", file=sys.stderr, flush=True)
            r = measure(work, target, env, workers, databases[0] if databases else None)
            # Read again: another run (other modules) may have written meanwhile.
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            results[target.name] = r
            print(f"mutation: {target.module}: {r['killed']}/{r['mutants']} killed ({r['score']} %), {r['survived']} survived",
                  file=sys.stderr, flush=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            write_report(results)
    finally:
        workers.stop()
        for name in [*databases, *([template] if template else [])]:
            drop_database(name, env)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
