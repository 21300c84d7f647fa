"""Every remediation rail, each in a test that fails when that rail is
switched off, in-process against the real PostgreSQL (fast enough for the
mutation run). Through a real remediation process: tests/test_rails_function.py;
``scale_deployment``'s own rails (never down, the ceiling): tests/test_actions.py."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from functions.remediation import rails
from functions.remediation.actions import TargetRef
from shared import incidents as svc
from shared.config import load_settings
from tests.factories import alert
from loopback.processes import wait_until

DEPLOYMENT = TargetRef("deployment", "email-service", "production")


def settings(database_url, **env):
    base = {"DATABASE_URL": database_url, "REMEDIATION_ALLOWED_NAMESPACES": "production,kube-system"}
    return load_settings({**base, **{k.upper(): str(v) for k, v in env.items()}})


def new_incident(engine, name="RailProbe", **labels) -> str:
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert(name, **labels)], "/test", "test").outcomes[0].incident_id


def judge(engine, config, action="rollout_restart", target=DEPLOYMENT, dry_run=False):
    with engine.begin() as conn:
        return rails.judge(conn, config, action, target, dry_run)


def record(engine, incident_id, action="rollout_restart", target=DEPLOYMENT, dry_run=False, blocked_by=None, age_seconds=0):
    with engine.begin() as conn:
        run_id = rails.runs.record(conn, incident_id, action, str(target), dry_run, blocked_by, "x" if blocked_by else "")
        if age_seconds:
            conn.execute(
                sa.text("UPDATE remediation_runs SET started_at = started_at - make_interval(secs => :s) WHERE id = :id"),
                {"s": age_seconds, "id": run_id},
            )
    return run_id


# --------------------------------------------------------------------------- the judge


def test_denied_targets_block_even_inside_an_allowed_namespace(database_url, clean_db):
    config = settings(database_url)
    assert config.remediation_denied_targets == ("kube-system/*",)
    verdict = judge(clean_db, config, target=TargetRef("deployment", "coredns", "kube-system"))
    assert verdict.blocked_by == "denied_target" and "kube-system/*" in verdict.reason and "kube-system/coredns" in verdict.reason
    assert judge(clean_db, config).blocked_by is None


def test_a_denied_pattern_names_one_workload_and_spares_the_others(database_url, clean_db):
    config = settings(database_url, remediation_denied_targets="production/payments-*,kube-system/*")
    assert judge(clean_db, config, target=TargetRef("deployment", "payments-api", "production")).blocked_by == "denied_target"
    assert judge(clean_db, config, target=TargetRef("deployment", "email-service", "production")) == rails.ALLOWED


def test_node_actions_need_the_opt_in(database_url, clean_db):
    node = TargetRef("node", "node-7")
    off = judge(clean_db, settings(database_url), "cordon_node", node)
    assert off.blocked_by == "node_actions_disabled" and "REMEDIATION_ALLOW_NODE_ACTIONS" in off.reason
    assert judge(clean_db, settings(database_url, remediation_allow_node_actions="true"), "cordon_node", node) == rails.ALLOWED


def test_node_opt_in_does_not_open_denied_nodes(database_url, clean_db):
    config = settings(database_url, remediation_allow_node_actions="true", remediation_denied_targets="control-plane-*")
    assert judge(clean_db, config, "cordon_node", TargetRef("node", "control-plane-1")).blocked_by == "denied_target"


def test_namespace_allow_list(database_url, clean_db):
    config = settings(database_url)
    verdict = judge(clean_db, config, target=TargetRef("deployment", "email-service", "staging"))
    assert verdict.blocked_by == "namespace_allow_list" and "staging" in verdict.reason and "production, kube-system" in verdict.reason
    nobody = settings(database_url, remediation_allowed_namespaces="")
    assert "(none)" in judge(clean_db, nobody).reason
    # Cluster-scoped targets have no namespace to check.
    assert judge(clean_db, nobody, "terminate_idle_db_connections", TargetRef("database", "REMEDIATION_DB_DSN")) == rails.ALLOWED


def test_cooldown_blocks_a_recent_live_run_on_the_same_action_and_target(database_url, clean_db):
    config = settings(database_url, remediation_cooldown_seconds=900)
    record(clean_db, new_incident(clean_db))
    verdict = judge(clean_db, config)
    assert verdict.blocked_by == "cooldown" and "900s" in verdict.reason and "production/email-service" in verdict.reason
    assert judge(clean_db, config, "scale_deployment") == rails.ALLOWED
    assert judge(clean_db, config, target=TargetRef("deployment", "billing", "production")) == rails.ALLOWED


def test_cooldown_counts_only_live_unblocked_runs_within_the_window(database_url, clean_db):
    config = settings(database_url, remediation_cooldown_seconds=900)
    incident_id = new_incident(clean_db)
    record(clean_db, incident_id, dry_run=True)
    record(clean_db, incident_id, blocked_by="hourly_cap")
    record(clean_db, incident_id, age_seconds=901)
    assert judge(clean_db, config) == rails.ALLOWED
    record(clean_db, incident_id, age_seconds=880)
    assert judge(clean_db, config).blocked_by == "cooldown"
    assert judge(clean_db, settings(database_url, remediation_cooldown_seconds=0)) == rails.ALLOWED


def test_hourly_cap_counts_live_unblocked_runs_of_the_last_hour(database_url, clean_db):
    config = settings(database_url, remediation_max_actions_per_hour=2, remediation_cooldown_seconds=0)
    incident_id = new_incident(clean_db)
    record(clean_db, incident_id, dry_run=True)
    record(clean_db, incident_id, blocked_by="cooldown")
    record(clean_db, incident_id, age_seconds=3700)
    record(clean_db, incident_id, target=TargetRef("deployment", "a", "production"))
    assert judge(clean_db, config) == rails.ALLOWED
    record(clean_db, incident_id, target=TargetRef("deployment", "b", "production"))
    verdict = judge(clean_db, config)
    assert verdict.blocked_by == "hourly_cap" and "2 live actions" in verdict.reason and "(2)" in verdict.reason
    # The cap limits changes; a dry-run changes nothing.
    assert judge(clean_db, config, dry_run=True) == rails.ALLOWED


def test_a_human_is_never_blocked(database_url, clean_db):
    config = settings(database_url, remediation_max_actions_per_hour=0, remediation_denied_targets="*")
    incident_id = new_incident(clean_db)
    human = TargetRef("human", "on-call")
    record(clean_db, incident_id, "escalate", human)
    assert judge(clean_db, config, "escalate", human) == rails.ALLOWED


def test_judge_and_record_keeps_the_verdict(database_url, clean_db):
    config = settings(database_url)
    incident_id = new_incident(clean_db)
    with clean_db.begin() as conn:
        verdict, run_id = rails.judge_and_record(conn, config, incident_id, "rollout_restart", TargetRef("deployment", "x", "staging"), False)
    with clean_db.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM remediation_runs WHERE id = :i"), {"i": run_id}).mappings().one()
    assert verdict.blocked_by == "namespace_allow_list"
    assert (row["incident_id"], row["action"], row["target"], row["dry_run"], row["blocked_by"]) == (
        incident_id, "rollout_restart", "staging/x", False, "namespace_allow_list")
    assert row["details"] == {"reason": verdict.reason}
    with clean_db.begin() as conn:
        rails.finish(conn, run_id, True)
        assert conn.execute(sa.text("SELECT success FROM remediation_runs WHERE id = :i"), {"i": run_id}).scalar() is True


def _waiting_on_advisory_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar())


def test_the_lock_makes_a_racing_judge_see_the_first_record(database_url, clean_db):
    """The first incident holds the lock, judged and recorded but not yet
    committed; the second must wait for it, then see its run and stop."""
    config = settings(database_url, remediation_max_actions_per_hour=1, remediation_cooldown_seconds=0)
    first, second = new_incident(clean_db), new_incident(clean_db, "RailProbe2")
    verdicts, errors = [], []

    def racer():
        try:
            with clean_db.begin() as conn:
                verdicts.append(rails.judge_and_record(conn, config, second, "scale_deployment", DEPLOYMENT, False)[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    with clean_db.begin() as conn:
        verdict, _ = rails.judge_and_record(conn, config, first, "rollout_restart", DEPLOYMENT, False)
        assert verdict == rails.ALLOWED
        thread = threading.Thread(target=racer)
        thread.start()
        # Either it queues behind the lock, or (without the lock) it has
        # already judged without seeing the first run: both end the wait.
        wait_until(lambda: _waiting_on_advisory_lock(clean_db) or not thread.is_alive(), 10, message="the racer to reach the lock")
    thread.join(10)
    assert not errors, errors
    assert [v.blocked_by for v in verdicts] == ["hourly_cap"]


def test_only_nodes_need_the_node_opt_in(database_url, clean_db):
    config = settings(database_url)
    for kind, name in (("pods", "app=web"), ("job", "cleanup-*"), ("deployment", "web")):
        assert judge(clean_db, config, "x", TargetRef(kind, name, "production")) == rails.ALLOWED, kind


def test_kinds_are_compared_by_value(database_url, clean_db):
    """A kind built at run time (not the interned literal) is judged the same."""
    config = settings(database_url, remediation_max_actions_per_hour=0, remediation_denied_targets="*")
    assert judge(clean_db, config, "escalate", TargetRef("".join(["hu", "man"]), "on-call")) == rails.ALLOWED
    node = TargetRef("".join(["no", "de"]), "node-7")
    assert judge(clean_db, settings(database_url), "cordon_node", node).blocked_by == "node_actions_disabled"


def test_a_one_second_cooldown_still_counts(database_url, clean_db):
    record(clean_db, new_incident(clean_db))
    assert judge(clean_db, settings(database_url, remediation_cooldown_seconds=1)).blocked_by == "cooldown"


def test_hourly_cap_holds_above_the_cap_and_for_large_counts(database_url, clean_db):
    incident_id = new_incident(clean_db)
    for name in ("a", "b", "c"):
        record(clean_db, incident_id, target=TargetRef("deployment", name, "production"))
    # Lowered below what already ran: still blocked, not only at equality.
    assert judge(clean_db, settings(database_url, remediation_max_actions_per_hour=2, remediation_cooldown_seconds=0)).blocked_by == "hourly_cap"
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO remediation_runs (incident_id, action, target, dry_run) "
            "SELECT :i, 'rollout_restart', 'production/w' || n, false FROM generate_series(1, 297) AS n"), {"i": incident_id})
    # 300 runs, a cap of 300: equal values that are not the same int object.
    config = settings(database_url, remediation_max_actions_per_hour=300, remediation_cooldown_seconds=0)
    assert judge(clean_db, config).blocked_by == "hourly_cap"


def test_a_verdict_cannot_be_changed_after_the_fact():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        rails.ALLOWED.blocked_by = "changed"
