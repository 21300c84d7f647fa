"""``/health`` checks the database with pg8000's own connection until the
first real request imports SQLAlchemy (shared/dbcheck.py): the same
connection arguments as the engine's, and the same answers."""

from __future__ import annotations


import pytest
import requests
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.pg8000 import PGDialect_pg8000

from loopback.processes import FunctionProcess
from shared import db, dbcheck
from tests.conftest import TEST_TOKEN, proxied_database


@pytest.mark.parametrize("url", [
    "postgresql+pg8000://postgres@127.0.0.1:5432/postgres",
    "postgresql+pg8000://ir%40app:p%3Ass%2Fw0rd@db.example.org/incidents%20db",
    "postgresql+pg8000://[::1]:6432/incidents?application_name=mine",
    "postgresql+pg8000://bouncer:secret@/incidents?unix_sock=/run/pgbouncer/.s.PGSQL.6432",
])
def test_the_drivers_arguments_are_the_engines(url):
    plain, extra = db.split_unix_sock(url)
    _, expected = PGDialect_pg8000().create_connect_args(sa.engine.make_url(plain))
    expected.update(extra)
    expected["timeout"] = 3.0
    expected.setdefault("application_name", "incident-response")
    assert dbcheck.connect_args(url, 3.0) == expected


@pytest.fixture
def proxied(database_url):
    with proxied_database(database_url) as proxied:
        yield proxied


def test_health_before_the_first_real_request_follows_the_database(base_env, proxied):
    proxy, url = proxied
    proc = FunctionProcess("query", {**base_env, "DATABASE_URL": url, "DB_TIMEOUT_SECONDS": "2"}, threads=2).start()
    try:
        def health():
            return requests.get(proc.url + "/health", timeout=10)

        assert health().json() == {"status": "healthy", "database": "connected"}
        proxy.cut()
        answer = health()
        assert (answer.status_code, answer.json()["database"]) == (503, "disconnected")
        proxy.restore()
        assert health().status_code == 200
        # The first real request: from now on the engine's pool answers.
        listed = requests.get(proc.url + "/incidents", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10)
        assert listed.status_code == 200
        assert health().status_code == 200
        proxy.cut()
        assert health().status_code == 503
    finally:
        proxy.restore()
        proc.stop()
