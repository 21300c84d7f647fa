"""Mutation testing of the modules where a wrong line costs the most, with
cosmic-ray: each mutant runs only the fast tests that concern its module,
one at a time, in a copy of the tree (the working tree is never mutated).
Writes the score and every surviving mutant to docs/mutation.md.

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
    Target("actions", "functions/remediation/actions.py", "--noconftest tests/test_actions.py "
           "tests/test_remediation_selectors.py::test_parameters_that_would_select_a_whole_namespace_are_refused "
           "tests/test_remediation_selectors.py::test_narrow_parameters_are_accepted "
           "tests/test_remediation_selectors.py::test_a_refused_selector_says_why"),
    Target("batching", "functions/intake/batching.py", "tests/test_group_commit_slices.py tests/test_group_commit.py"),
    Target("delivery", "functions/escalation/delivery.py", "--noconftest tests/test_delivery.py"),
    Target("errors", "shared/errors.py", "--noconftest tests/test_http_dispatch.py"),
    Target("http", "shared/http.py", "--noconftest tests/test_http_dispatch.py tests/test_http_errors_app.py tests/test_http_limits.py"),
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


def drop_template(name: str, env: dict) -> None:
    from shared import db

    db.run_outside_transaction(_database_url(env, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# `cosmic-ray http-worker` listens on every interface; this one on loopback only.
WORKER = """
from aiohttp import web
from cosmic_ray.distribution.http import handle_mutate_and_test
app = web.Application()
app.add_routes([web.post("/", handle_mutate_and_test)])
web.run_app(app, host="127.0.0.1", port={port}, print=None)
"""


class Workers:
    """cosmic-ray's http workers, each in a copy of the tree of its
    own (a worker mutates the module in place), fed by the http distributor.
    Every test session makes its own database, so two mutants never share
    one."""

    def __init__(self, work: Path, env: dict, count: int):
        import socket

        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for i in range(count if count > 1 else 0):
            copy = work / f"worker-{i}"
            shutil.copytree(work / "tree", copy, symlinks=True)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            log = (work / f"worker-{i}.log").open("w")
            self.processes.append(subprocess.Popen([str(BIN / "python"), "-c", WORKER.format(port=port)], cwd=copy,
                                                   env={**env, "PYTHONPATH": str(copy)}, stdout=log, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(self.urls, self.processes, strict=True):
            self._wait(url, process)

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


def config_text(target: Target, workers: list[str]) -> str:
    # Relative paths: each worker mutates and tests the copy it runs in.
    test_command = f"{BIN / 'python'} {PYTEST} {target.tests}"
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


def measure(work: Path, target: Target, env: dict, workers: list[str]) -> dict:
    tree = work / "tree"
    config = work / f"{target.name}.toml"
    session = work / f"{target.name}.sqlite"
    config.write_text(config_text(target, workers))
    started = time.monotonic()
    # The selection must pass on the unmutated code, or every mutant "dies".
    run([str(BIN / "python"), *PYTEST.split(), *_split(target.tests)], tree, env)
    run([str(BIN / "cosmic-ray"), "init", str(config), str(session)], tree, env)
    run([str(BIN / "cr-filter-operators"), str(session), str(config)], tree, env)
    skip_annotations(session, tree / target.module)
    run([str(BIN / "cosmic-ray"), "exec", str(config), str(session)], tree, env, capture=False)
    dump = run([str(BIN / "cosmic-ray"), "dump", str(session)], tree, env).stdout
    return summarise(target, dump, tree, time.monotonic() - started)


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
    killed = survived = skipped = incompetent = timeouts = annotations = 0
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
            mutation = item["mutations"][0]
            row = mutation["start_pos"][0]
            survivors.append({
                "line": row,
                "operator": mutation["operator_name"],
                "occurrence": mutation["occurrence"],
                "code": source[row - 1].strip() if row <= len(source) else "",
                "diff": _diff_lines(result.get("diff") or ""),
            })
        elif outcome == "incompetent":
            incompetent += 1
        else:
            killed += 1
    tested = killed + survived + incompetent
    return {
        "module": target.module, "tests": target.tests, "mutants": tested, "killed": killed + incompetent,
        "incompetent": incompetent, "timeouts": timeouts, "survived": survived, "skipped": skipped, "annotations": annotations,
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
        "Measured with cosmic-ray (pinned in requirements-dev.txt) by `make mutation` (scripts/mutation.py): every",
        "mutant of a module runs only that module's fast tests (column *tests*), two mutants at a time, each worker in",
        "a copy of the tree of its own (`MUTATION_WORKERS`). A mutant is *killed* when a test fails (or the mutated module cannot even be imported:",
        "*incompetent*, counted as killed). Left out: `**` unpacking taken for a power, and swaps to",
        "power, modulo, floor division, shifts and bitwise and/xor (they only make type errors; see the script);",
        "and mutants inside annotations Python never evaluates (`from __future__ import annotations`: a",
        "signature's, a dataclass field's, a local variable's), which cannot change behaviour (column *annotations*).",
        "",
        "| module | mutants | killed | survived | score | timeouts | annotations | run time | measured | tests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['score']} % | {r['timeouts']} | "
                     f"{r.get('annotations', '-')} | {_minutes(r['seconds'])} | {r['measured_at']} | `{r['tests']}` |")
    if total_mutants:
        lines.append(f"| **all measured** | {total_mutants} | {total_killed} | {total_mutants - total_killed} | "
                     f"**{100.0 * total_killed / total_mutants:.1f} %** | | | {_minutes(sum(r['seconds'] for r in rows))} | | |")
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    lines += ["", "## Surviving mutants", ""]
    for r in rows:
        lines.append(f"### `{r['module']}` ({r['survived']})")
        lines.append("")
        if not r["survivors"]:
            lines += ["None.", ""]
            continue
        for s in r["survivors"]:
            change = " / ".join(d.strip() for d in s["diff"][:2]) or s["code"]
            lines.append(f"- line {s['line']}, `{s['operator'].removeprefix('core/')}`: `{change[:200]}`")
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
    workers = Workers(work, env, WORKERS)
    try:
        for target in TARGETS:
            if target.name not in wanted:
                continue
            print(f"mutation: {target.module} with {target.tests}", file=sys.stderr, flush=True)
            r = measure(work, target, env, workers.urls)
            # Read again: another run (other modules) may have written meanwhile.
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            results[target.name] = r
            print(f"mutation: {target.module}: {r['killed']}/{r['mutants']} killed ({r['score']} %), {r['survived']} survived",
                  file=sys.stderr, flush=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            write_report(results)
    finally:
        workers.stop()
        if template:
            drop_template(template, env)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
