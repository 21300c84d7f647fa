"""Code rolled out before its migrations: the intake answers 503 (the sender
retries) and readiness fails while the schema is older than the code; the
same errors against an up-to-date schema stay 500 (they are bugs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
import sqlalchemy as sa

from shared import db, migrate, schema
from tests.conftest import ROOT, TEST_TOKEN
from tests.factories import fixture_payload
from loopback.processes import FunctionProcess, wait_until


def test_the_codes_head_revision_is_the_migrations_head():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config("postgresql+pg8000://unused/unused"))
    assert scripts.get_heads() == [schema.HEAD_REVISION]


def test_revision_ids_grow_along_the_chain_so_an_older_one_sorts_first():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config("postgresql+pg8000://unused/unused"))
    chain = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    assert chain == sorted(chain) and all(len(r) == len(schema.HEAD_REVISION) and r.isdigit() for r in chain)
    assert all(schema.behind(r) for r in chain[:-1]) and not schema.behind(chain[-1])
    assert schema.behind(None) and not schema.behind(str(int(schema.HEAD_REVISION) + 1).zfill(len(schema.HEAD_REVISION)))


@pytest.fixture
def empty_url(database_url):
    """A database of its own, never migrated."""
    name = f"ir_schema_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(database_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    db.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    yield urlunsplit(parts._replace(path="/" + name))
    db.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The last revision before the intake's write cycle became server-side
# functions (migration 0018): code of any later head calls functions such a
# database lacks, whatever migrations come after.
BEFORE_INTAKE_FUNCTIONS = "0017"


@pytest.fixture
def scratch_url(empty_url):
    """A database of its own, migrated to a revision older than the code
    whose tables the intake's statements need but not its functions."""
    migrate.upgrade(empty_url, BEFORE_INTAKE_FUNCTIONS)
    return empty_url


def _previous_revision() -> str:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config("postgresql+pg8000://unused/unused"))
    return scripts.get_revision(schema.HEAD_REVISION).down_revision


def _post(proc, payload) -> requests.Response:
    return requests.post(proc.url + "/webhook/alert", data=json.dumps(payload), timeout=30,
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {TEST_TOKEN}"})


def test_the_intake_before_its_migration_answers_503_and_is_not_ready_then_serves_once_migrated(base_env, scratch_url):
    # Readiness fails on purpose here, so the start waits for any answer.
    intake = FunctionProcess("intake", {**base_env, "DATABASE_URL": scratch_url}, threads=2).start(wait_path="/no-such-path")
    try:
        health = requests.get(intake.url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["database"] == "schema_behind" and "run the migrations" in health.json()["message"]

        answer = _post(intake, fixture_payload("testincident-firing.json"))
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "schema_behind" and "run the migrations" in answer.json()["message"]
        assert answer.headers["Retry-After"]
        assert "Database schema older than this code: run the migrations" in intake.logs()

        migrate.upgrade(scratch_url)
        # The revision is read again within seconds (shared/schema.py RECHECK_SECONDS).
        wait_until(lambda: requests.get(intake.url + "/health", timeout=10).status_code == 200, 30,
                   message="readiness once migrated")
        answer = _post(intake, fixture_payload("testincident-firing.json"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["action"] == "created"
    finally:
        intake.stop()


def test_a_missing_column_of_an_up_to_date_schema_is_a_bug_not_a_retry(engine):
    schema.forget()
    with pytest.raises(sa.exc.DBAPIError) as caught:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT no_such_column FROM incidents"))
    assert schema.sqlstate(caught.value) == "42703"
    assert not db.schema_behind(caught.value, engine)
    assert not db.is_transient(caught.value)


def test_the_same_error_against_an_older_schema_is_a_retry(scratch_url):
    schema.forget()
    older = db.create_engine_for(scratch_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught:
            with older.connect() as conn:
                conn.execute(sa.text("SELECT noise_flaps_unless_windowed(CAST(NULL AS timestamp), CAST('[]' AS jsonb))"))
        assert schema.sqlstate(caught.value) == "42883"
        assert db.schema_behind(caught.value, older)
        assert db.database_state(older) == "schema_behind"
    finally:
        older.dispose()
        schema.forget()


def _state_before_the_first_real_request(url: str) -> list[str]:
    """What ``/health``'s check answers in a fresh process, on pg8000's own
    connection (shared/dbcheck.py), and whether that imported the engine."""
    code = "import sys; from shared import dbcheck; print(dbcheck.database_state(), 'shared.db' in sys.modules)"
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_readiness_on_the_drivers_own_connection_reads_the_revision(database_url, empty_url):
    assert _state_before_the_first_real_request(database_url) == ["connected", "False"]
    assert _state_before_the_first_real_request(empty_url) == ["schema_behind", "False"]  # never migrated
    migrate.upgrade(empty_url, _previous_revision())
    assert _state_before_the_first_real_request(empty_url) == ["schema_behind", "False"]
    migrate.upgrade(empty_url)
    assert _state_before_the_first_real_request(empty_url) == ["connected", "False"]


@pytest.mark.parametrize("migrated", [False, True], ids=["older-schema", "up-to-date"])
def test_any_functions_undefined_function_is_503_only_while_the_schema_is_older(scratch_url, monkeypatch, migrated):
    """shared.http's last resort (every function's routes): the engine is the
    process's own (DATABASE_URL), as in a function."""
    from flask import Flask, request

    from shared import config as config_module
    from shared.config import Secret
    from shared.http import Route, dispatch

    if migrated:
        migrate.upgrade(scratch_url)
    monkeypatch.setenv("DATABASE_URL", scratch_url)
    config_module.reset_settings_cache()
    db.dispose_engine()
    schema.forget()
    judged = []
    monkeypatch.setattr(schema, "database_behind", lambda read, judge=schema.database_behind: judged.append(1) or judge(read))

    def calls_a_later_function(req):
        with db.engine().connect() as conn:
            conn.execute(sa.text("SELECT no_such_function_yet()"))

    try:
        with Flask(__name__).test_request_context("/later"):
            answer = dispatch(request, [Route("GET", "/later", calls_a_later_function, auth=False)], Secret("t"), "test")
    finally:
        db.dispose_engine()
        monkeypatch.undo()
        config_module.reset_settings_cache()
        schema.forget()
    assert len(judged) == 1  # once per error, whatever the answer
    if migrated:
        assert (answer.status_code, answer.get_json()["error"]) == (500, "internal_error")
    else:
        assert (answer.status_code, answer.get_json()["error"]) == (503, "schema_behind")
        assert answer.headers["Retry-After"]


class _Readings:
    """A ``read_revision`` that counts its calls and answers ``outcome``
    (a revision, or an exception to raise)."""

    def __init__(self, outcome):
        self.outcome, self.calls = outcome, 0

    def __call__(self):
        self.calls += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.fixture
def fresh_readings():
    schema.forget()
    yield
    schema.forget()


def test_a_failed_reading_of_the_revision_is_trusted_briefly_too(fresh_readings, monkeypatch):
    """Every request meets the missing object while the schema is behind: a
    reading that fails (the pool exhausted, the database gone) must not be
    retried by each of them, one after another."""
    now = [1000.0]
    monkeypatch.setattr(schema, "_monotonic", lambda: now[0])
    failing = _Readings(TimeoutError("pool exhausted"))
    assert [schema.database_behind(failing) for _ in range(5)] == [False] * 5
    assert failing.calls == 1
    now[0] += schema.FAILED_RECHECK_SECONDS
    assert not schema.database_behind(failing)
    assert failing.calls == 2


def test_a_failed_reading_keeps_the_last_answer(fresh_readings, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(schema, "_monotonic", lambda: now[0])
    assert schema.database_behind(_Readings("0001"))
    now[0] += schema.RECHECK_SECONDS
    failing = _Readings(TimeoutError("pool exhausted"))
    assert schema.database_behind(failing) and failing.calls == 1
    assert schema.database_behind(failing) and failing.calls == 1


def test_one_thread_reads_the_revision_while_the_others_take_the_last_answer(fresh_readings, monkeypatch):
    import threading

    now = [1000.0]
    monkeypatch.setattr(schema, "_monotonic", lambda: now[0])
    assert schema.database_behind(_Readings("0001"))
    now[0] += schema.RECHECK_SECONDS
    entered, let_go = threading.Event(), threading.Event()

    def slow_reading():
        entered.set()
        let_go.wait(30)
        return schema.HEAD_REVISION

    reader = threading.Thread(target=schema.database_behind, args=(slow_reading,))
    reader.start()
    try:
        assert entered.wait(30)
        others = _Readings(schema.HEAD_REVISION)
        assert schema.database_behind(others)  # the last answer, without waiting for the reading
        assert others.calls == 0
    finally:
        let_go.set()
        reader.join(30)
    assert not schema.database_behind(others) and others.calls == 0  # the reader's answer, trusted from now


def test_the_first_answer_waits_for_the_reading_in_flight(fresh_readings):
    import threading

    entered, let_go = threading.Event(), threading.Event()

    def slow_reading():
        entered.set()
        let_go.wait(30)
        return "0001"

    reader = threading.Thread(target=schema.database_behind, args=(slow_reading,))
    reader.start()
    answers: list[bool] = []
    assert entered.wait(30)
    other = threading.Thread(target=lambda: answers.append(schema.database_behind(_Readings(schema.HEAD_REVISION))))
    other.start()
    other.join(0.5)
    assert other.is_alive()  # no answer yet to take: it waits for the reader's
    let_go.set()
    reader.join(30)
    other.join(30)
    assert answers == [True]
