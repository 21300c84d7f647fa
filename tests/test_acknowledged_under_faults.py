"""Concurrent webhooks while the database connection keeps dropping: every
webhook the intake answered 2xx is stored, every other one was answered
503 (AlertManager retries it), never 500 or a dropped connection. The
group commit, the pool's reconnection and the error map together, under the
load that makes batches share transactions."""

from __future__ import annotations

import itertools
import json
import threading
import uuid

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess, wait_until
from tests.conftest import TEST_TOKEN, proxied_database
from tests.factories import raw_alert, webhook

HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}
SENDERS = 8
OUTAGES = 3


@pytest.fixture
def intake_behind_proxy(base_env, database_url):
    with proxied_database(database_url) as (proxy, url):
        intake = FunctionProcess("intake", {**base_env, "DATABASE_URL": url, "DB_TIMEOUT_SECONDS": "2"}).start()
        try:
            yield intake, proxy
        finally:
            intake.stop()


def test_every_acknowledged_webhook_is_stored_while_the_database_drops_away(intake_behind_proxy, clean_db):
    intake, proxy = intake_behind_proxy
    run = uuid.uuid4().hex[:8]
    counter = itertools.count()
    answers: list[tuple[list[str], int | str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender():
        session = requests.Session()
        while not stop.is_set():
            n = next(counter)
            # Now and then a webhook of several alerts, so batches mix sizes.
            alerts = [raw_alert("FaultProbe", fingerprint=f"{run}-{n}-{k}", n=str(n), k=str(k)) for k in range(1 + n % 3)]
            try:
                status = session.post(intake.url + "/webhook/alert", data=json.dumps(webhook(alerts)), headers=HEADERS,
                                      timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                answers.append(([a["fingerprint"] for a in alerts], status))

    def count(status) -> int:
        with lock:
            return sum(1 for _, s in answers if s == status)

    def more_than_now(status, more: int):
        """A condition: ``more`` answers of ``status`` beyond those so far."""
        target = count(status) + more
        return lambda: count(status) >= target

    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        for _ in range(OUTAGES):
            wait_until(more_than_now(200, 40), 60, message="webhooks acknowledged between outages")
            refused = more_than_now(503, SENDERS)
            proxy.cut()
            try:
                wait_until(refused, 60, message="webhooks refused during the outage")
            finally:
                proxy.restore()
        wait_until(more_than_now(200, 40), 60, message="webhooks acknowledged after the last outage")
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    statuses = {s for _, s in answers}
    assert statuses <= {200, 503}, statuses
    with clean_db.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT fingerprint FROM incidents WHERE alert_name = 'FaultProbe'")).scalars())
    acknowledged = {fp for fps, s in answers if s == 200 for fp in fps}
    assert acknowledged - stored == set()
