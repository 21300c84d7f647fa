"""Group commit: a lone webhook is written at once. (Shared transactions,
slices and failures under certain overlap: tests/test_group_commit_slices.py.)"""

from functions.intake.batching import GroupCommit
from shared import incidents as svc
from tests.factories import alert


def writer(engine, calls):
    def write(alerts):
        calls.append(len(alerts))
        with engine.begin() as conn:
            return svc.record_alerts(conn, alerts, "/t", "alertmanager")
    return write


def test_a_lone_submission_is_written_at_once(clean_db):
    calls = []
    batcher = GroupCommit(writer(clean_db, calls))
    assert batcher.submit([alert("Alone")]).outcomes[0].action == "created"
    assert calls == [1]
