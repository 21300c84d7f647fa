"""A dead letter is recorded once also when the Broker names no destination.

The unique key of migration 0006 is (event_source, event_id,
error_destination), and the destination (the ``knativeerrordest``
attribute) is nullable: NULLs are distinct, so the same letter handed over
twice without it became two rows. The new unique index keys on
``COALESCE(error_destination, '')``: a missing destination is one value.
(``NULLS NOT DISTINCT`` would say the same, but it needs PostgreSQL 15 and
docs/deploy.md supports 13.) An empty destination names nothing either, so
it is the same letter as a missing one.

Upgrade first merges the duplicates this let in, keeping the oldest row of
each letter (its id is the one the first timeline note and log line gave):
it takes the sum of the redeliveries, the latest redelivery's who, when,
outcome and error, the latest error code and answer (as a repeat of a
letter always did), an incident any of them named, and ``dead_again`` when
a copy arrived after the latest redelivery. Timeline entries that point at
a merged row (``dead_letter``, ``dead_letter_redelivered``) then point at
the kept one. The table is locked while this runs so that no copy slips in
between the merge and the index.

The constraint of 0006 stays: the previous release's sink names it in its
``ON CONFLICT ON CONSTRAINT`` (migrations are forward-compatible with the
previous revision); the new index is stricter, so it changes nothing for
this release. A later migration drops it once no release names it. While
both releases run, the previous one answers a repeat without destination
with a unique violation (a 500 the Broker retries): the letter is already
stored once, so nothing is lost.

Downgrade drops the index; the merged rows stay merged (the old key allows
one row as well as two).

Revision ID: 0023
Revises: 0020
"""

from alembic import op

revision = "0023"
down_revision = "0020"
branch_labels = None
depends_on = None

INDEX = "uq_dead_letters_letter"
# The key, as the sink's ON CONFLICT names it (shared/dead_letters.py).
KEY = "event_source, event_id, (COALESCE(error_destination, ''))"

MERGE = """
CREATE TEMPORARY TABLE dead_letter_merge ON COMMIT DROP AS
SELECT id, first_value(id) OVER letter AS keep
FROM dead_letters
WINDOW letter AS (PARTITION BY event_source, event_id, COALESCE(error_destination, '')
                  ORDER BY received_at, id ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING);
DELETE FROM dead_letter_merge WHERE id = keep;

WITH letters AS (
    SELECT m.keep, d.*
    FROM dead_letters d JOIN (SELECT id, keep FROM dead_letter_merge
                              UNION ALL SELECT DISTINCT keep, keep FROM dead_letter_merge) m ON m.id = d.id
), merged AS (
    SELECT keep,
           sum(redelivery_count) AS redelivery_count,
           max(redelivered_at) AS redelivered_at,
           max(received_at) AS last_received_at,
           (array_agg(incident_id ORDER BY received_at, id) FILTER (WHERE incident_id IS NOT NULL))[1] AS incident_id,
           (array_agg(error_code ORDER BY received_at DESC, id DESC))[1] AS error_code,
           (array_agg(error_data ORDER BY received_at DESC, id DESC))[1] AS error_data,
           (array_agg(redelivered_by ORDER BY redelivered_at DESC NULLS LAST, id DESC))[1] AS redelivered_by,
           (array_agg(redelivery_status ORDER BY redelivered_at DESC NULLS LAST, id DESC))[1] AS redelivery_status,
           (array_agg(redelivery_error ORDER BY redelivered_at DESC NULLS LAST, id DESC))[1] AS redelivery_error
    FROM letters GROUP BY keep
)
UPDATE dead_letters d SET
    redelivery_count = m.redelivery_count,
    redelivered_at = m.redelivered_at,
    redelivered_by = m.redelivered_by,
    redelivery_status = CASE WHEN m.redelivered_at IS NOT NULL AND m.last_received_at > m.redelivered_at
                             THEN 'dead_again' ELSE m.redelivery_status END,
    redelivery_error = m.redelivery_error,
    error_code = m.error_code,
    error_data = m.error_data,
    incident_id = COALESCE(d.incident_id, m.incident_id)
FROM merged m WHERE d.id = m.keep;

UPDATE incident_timeline t SET details = jsonb_set(t.details, '{dead_letter_id}', to_jsonb(m.keep))
FROM dead_letter_merge m
WHERE t.kind IN ('dead_letter', 'dead_letter_redelivered')
  AND jsonb_typeof(t.details -> 'dead_letter_id') = 'number'
  AND (t.details ->> 'dead_letter_id')::bigint = m.id;

DELETE FROM dead_letters d USING dead_letter_merge m WHERE d.id = m.id;
DROP TABLE dead_letter_merge;
"""


def upgrade() -> None:
    # No letter may arrive between the merge and the index (reads go on).
    op.execute("LOCK TABLE dead_letters IN SHARE ROW EXCLUSIVE MODE")
    for statement in MERGE.split(";\n"):
        if statement.strip():
            op.execute(statement)
    op.execute(f"CREATE UNIQUE INDEX {INDEX} ON dead_letters ({KEY})")


def downgrade() -> None:
    op.execute(f"DROP INDEX {INDEX}")
