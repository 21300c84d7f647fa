"""The fault the reconciliation exists for: the database goes away for
longer than the Broker retries, while acknowledged P0 alerts are in flight.
The consumers answer 503, the Broker gives up, the dead-letter sink cannot
record anything either (same database) and the events are gone. When the
database returns, the sweep finds the incidents stuck between steps and
re-emits their events: every acknowledged P0 is diagnosed and paged, once."""

from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
import sqlalchemy as sa

from local.run import FUNCTIONS, Stack
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from loopback.servers import TcpProxy
from loopback.processes import free_port, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
ROUTING_KEY = "OUTAGEROUTINGKEY0123456789abcdef"
ALERTS = 6


class ProxiedStack(Stack):
    """Every function but the AlertManager intake reaches the database
    through the proxy, so the intake keeps acknowledging during the outage
    while every consumer, the dead-letter sink and the sweep lose it."""

    proxied_url: str = ""

    def function_env(self, service: str) -> dict:
        env = super().function_env(service)
        if service != "intake":
            env["DATABASE_URL"] = self.proxied_url
        return env


@pytest.fixture
def outage_stack(database_url, pd, slack_hook, clean_db, tmp_path):
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    env = {
        "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + "/services/T/B/X",
        "REMEDIATION_MODE": "off",
        "PAGE_ON_FAILURE_PRIORITIES": "P2",  # a P0 pages once: when it opens
        "LOCAL_PING_INTERVAL_SECONDS": "3600",  # the test sweeps when it wants to
        "LOCAL_BROKER_RETRY": "2",
        "LOCAL_BROKER_BACKOFF_SECONDS": "0.1",
        "DB_TIMEOUT_SECONDS": "2",
        "RECONCILE_GRACE_SECONDS": "1",
        "RECONCILE_BACKOFF_SECONDS": "1",
        "RECONCILE_MAX_REEMITS": "3",
        "NOTIFY_MAX_ATTEMPTS": "2",
    }
    ports = {name: free_port() for name in FUNCTIONS}
    stack = ProxiedStack(database_url, TEST_TOKEN, ports, free_port(), env=env, log_dir=tmp_path)
    stack.proxied_url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    pd.reset(), slack_hook.reset()
    stack.start()
    yield stack, proxy
    stack.stop()
    proxy.stop()


def fire(stack, n):
    alert = raw_alert(f"DiskFull{n}", severity="critical", service=f"svc-{n}")
    response = requests.post(stack.url("intake") + "/webhook/alert", json=webhook([alert]), headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["incident_id"]


def sweep(stack):
    headers = {"ce-id": f"ping-{free_port()}", "ce-source": "/test/ping", "ce-specversion": "1.0",
               "ce-type": "dev.knative.sources.ping", "Content-Type": "application/json"}
    return requests.post(stack.url("intake-events") + "/events", data="{}", headers=headers, timeout=30)


def log_of(stack, service):
    return next(p for p in stack.processes if p.name == service).log_path.read_text(errors="replace")


def diagnosed(engine, incident_id):
    with engine.connect() as conn:
        return [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "diagnosed"]


def test_events_lost_in_a_database_outage_are_re_emitted_and_every_p0_is_paged_once(outage_stack, pd, clean_db):
    stack, proxy = outage_stack
    proxy.cut()
    try:
        incident_ids = [fire(stack, n) for n in range(ALERTS)]
        # Diagnostics and the P0 page: both deliveries of every opened event
        # exhaust their retries, then the sink refuses each of them three times.
        wait_until(lambda: len(stack.broker.dead_lettered) >= 2 * ALERTS, 60, message="every delivery to be dead-lettered")
        wait_until(lambda: log_of(stack, "deadletter").count("Database error") >= 3 * 2 * ALERTS, 60,
                   message="the dead-letter sink to refuse every dead letter")
    finally:
        proxy.restore()
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dead_letters")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")).scalar() == 0
    assert pd.bodies() == [] and not any(diagnosed(clean_db, i) for i in incident_ids)

    def recovered():
        sweep(stack)  # one that meets a pooled connection the outage broke answers 503; the PingSource pings again
        paged = [b["dedup_key"] for b in pd.bodies() if b["event_action"] == "trigger"]
        return all(diagnosed(clean_db, i) for i in incident_ids) and set(paged) == set(incident_ids)

    wait_until(recovered, 90, interval=1.0, message="every acknowledged P0 diagnosed and paged after the outage")
    # Further sweeps re-emit what still looks unfinished; nothing happens twice.
    for _ in range(3):
        assert sweep(stack).status_code == 200
        stack.broker.wait_idle(30)
    stack.broker.wait_idle(30)
    triggers = sorted(b["dedup_key"] for b in pd.bodies() if b["event_action"] == "trigger")
    assert triggers == sorted(incident_ids)
    assert all(len(diagnosed(clean_db, i)) == 1 for i in incident_ids)
    assert "Re-emitted the events of incidents stuck between steps" in log_of(stack, "intake-events")
