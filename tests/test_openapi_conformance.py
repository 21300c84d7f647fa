"""schemathesis fuzzes the running functions from the shipped OpenAPI
document: no 5xx, and every response conforms to the document."""

from datetime import datetime, timezone
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.conftest import TEST_TOKEN
from loopback.processes import FunctionProcess

SPEC = Path(__file__).resolve().parent.parent / "functions" / "query" / "openapi.yaml"
schema = schemathesis.openapi.from_path(str(SPEC))
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
MIN_REQUESTS = 1000
sent = {"count": 0}


@pytest.fixture(scope="module")
def servers(base_env, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE incidents, event_outbox, ignored_alerts CASCADE")
    query = FunctionProcess("query", dict(base_env)).start()
    intake = FunctionProcess("intake", dict(base_env)).start()
    yield {"query": query, "intake": intake}
    query.stop()
    intake.stop()
    assert sent["count"] >= MIN_REQUESTS, f"only {sent['count']} generated requests were sent"


def _instant(raw) -> datetime | None:
    try:
        value = datetime.fromisoformat(raw)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def out_of_order(query: dict) -> bool:
    """Both bounds given, both read, and until before since; a pair this
    cannot read keeps the "valid input accepted" check."""
    since, until = _instant(query.get("since")), _instant(query.get("until"))
    return since is not None and until is not None and until < since


@schema.parametrize()
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_response_conforms_and_none_is_a_server_error(case, servers):
    server = servers["intake"] if case.path.startswith("/webhook/") else servers["query"]
    # When the fuzzer deliberately breaks the headers (for example drops
    # Authorization), send them as generated: the API must refuse them.
    breaking_headers = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
    headers = {} if breaking_headers else dict(AUTH)
    sent["count"] += 1
    # A well-formed but forged cursor is refused (tested on its own); the
    # fuzzer cannot know which cursors the API issued.
    excluded = [positive_data_acceptance] if "cursor" in (case.query or {}) else []
    # An until before since is refused (400 naming until): a JSON Schema
    # cannot relate two parameters, so such a schema-valid pair may be refused.
    if out_of_order(case.query or {}):
        excluded.append(positive_data_acceptance)
    # The intake validates each alert on its own (one bad alert never costs
    # its group): a group holding a schema-violating alert next to others is
    # accepted by design, and refused only when no alert is usable.
    if case.path.startswith("/webhook/") and isinstance(case.body, dict) and isinstance(case.body.get("alerts"), list) and case.body["alerts"]:
        excluded.append(negative_data_rejection)
    # A maintenance window's matchers must be valid regexes, must not all
    # match the empty label set, and its end must lie ahead: no JSON Schema
    # can say so, so schema-valid windows may be refused (400, naming the field).
    if case.path == "/maintenance-windows" and case.method.upper() == "POST":
        excluded.append(positive_data_acceptance)
    case.call_and_validate(base_url=server.url, headers=headers, excluded_checks=excluded)
