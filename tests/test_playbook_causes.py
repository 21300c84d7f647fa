"""Playbooks may match on the diagnosis' most likely cause (``match.cause``)."""

import json

import pytest

from functions.remediation import playbooks as pb
from loopback.processes import FunctionProcess
from shared import incidents as svc
from tests.test_remediation import deliver, incident, reply_of

BOOKS = {"playbooks": [
    {"name": "crash-after-rollout", "match": {"alertname": "KubePodCrashLooping", "cause": "bad_rollout"},
     "actions": [{"action": "escalate", "params": {"reason": "a rollout broke it: roll back"}}]},
    {"name": "any-bad-rollout", "match": {"cause": "bad_rollout"}, "actions": [{"action": "escalate"}]},
    {"name": "crash", "match": {"alertname": "KubePodCrashLooping"}, "actions": [{"action": "escalate"}]},
]}


def test_a_playbook_naming_a_cause_matches_only_when_it_is_the_most_likely_one():
    books = pb.parse(BOOKS, "x.yaml")
    assert pb.find(books, "KubePodCrashLooping", {}, "bad_rollout").name == "crash-after-rollout"
    assert pb.find(books, "KubePodCrashLooping", {}, "oom_killed").name == "crash"
    assert pb.find(books, "KubePodCrashLooping", {}).name == "crash"
    assert pb.find(books, "HighErrorRate", {}, "bad_rollout").name == "any-bad-rollout"
    assert pb.find(books, "HighErrorRate", {}, "crash_loop") is None


def test_the_shipped_playbooks_roll_back_a_crash_loop_only_when_a_release_caused_it():
    shipped = pb.load()
    after_release = pb.find(shipped, "KubePodCrashLooping", {"namespace": "shop", "pod": "checkout-1"}, "bad_rollout")
    assert [s.action for s in after_release.steps] == ["rollback_deployment"]
    assert after_release.needs_approval("live") and after_release.verify is not None
    for other in ("crash_loop", "oom_killed", None):
        crash = pb.find(shipped, "KubePodCrashLooping", {"namespace": "shop", "pod": "checkout-1"}, other)
        assert [s.action for s in crash.steps] == ["delete_pods"], other


@pytest.mark.parametrize("match, message", [
    ({"alertname": "A", "cause": "gremlins"}, "field 'match.cause': unknown cause 'gremlins'"),
    ({"labels": ["a=b"]}, "field 'match.alertname': required"),
    ({"cause": "bad_rollout", "alertname": 3}, "field 'match.alertname': required"),
])
def test_a_bad_cause_match_is_refused_naming_the_field(match, message):
    with pytest.raises(pb.PlaybookError) as err:
        pb.parse({"playbooks": [{"name": "x", "match": match, "actions": [{"action": "escalate"}]}]}, "custom.yaml")
    assert message in str(err.value)


def test_remediation_picks_the_playbook_of_the_stored_cause(base_env, clean_db, tmp_path):
    path = tmp_path / "playbooks.yaml"
    path.write_text(json.dumps(BOOKS))
    proc = FunctionProcess("remediation", {**base_env, "KUBECONFIG": "/nonexistent", "REMEDIATION_MODE": "dry-run",
                                           "PLAYBOOKS_FILE": str(path)}).start()
    try:
        row = incident(clean_db, "KubePodCrashLooping", namespace="production")
        with clean_db.begin() as conn:
            svc.store_diagnostics(conn, row["id"], {"probable_causes": [
                {"cause": "bad_rollout", "confidence": 0.97, "summary": "Revision 7 rolled out.", "evidence": ["revision/7"]},
                {"cause": "crash_loop", "confidence": 0.85, "summary": "Pods restart.", "evidence": ["pod/a"]}]})
            row = svc.get_incident(conn, row["id"])
        event = reply_of(deliver(proc, row))
        assert event.data["remediation"]["playbook"] == "crash-after-rollout"
    finally:
        proc.stop()
