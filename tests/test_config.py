import pytest

from shared.config import ConfigError, Secret, load_settings

BASE = {"DATABASE_URL": "postgresql+pg8000://postgres@127.0.0.1:5432/app"}


def test_defaults_are_safe():
    s = load_settings(BASE)
    assert s.remediation_mode == "dry-run"
    assert s.remediation_allowed_namespaces == ()
    assert s.min_incident_priority == "P1"
    assert s.max_body_bytes == 1024 * 1024
    assert s.pagerduty_routing_key is None and s.slack_webhook_url is None
    assert s.severity_priority["critical"] == "P0"


def test_plain_postgresql_url_gets_the_pg8000_driver():
    s = load_settings({"DATABASE_URL": "postgresql://u@db:5432/app"})
    assert s.database_url == "postgresql+pg8000://u@db:5432/app"


@pytest.mark.parametrize(
    "url, phrase",
    [
        ("", "not set"),
        ("mysql://u@h/db", "unsupported scheme"),
        ("postgresql+pg8000://u@h:5432/", "no database name"),
        ("postgresql+pg8000://u@h:notaport/db", "malformed port"),
        ("postgresql+pg8000:///db", "no host"),
    ],
)
def test_bad_database_url_names_the_variable(url, phrase):
    with pytest.raises(ConfigError) as err:
        load_settings({"DATABASE_URL": url})
    assert str(err.value).startswith("DATABASE_URL:")
    assert phrase in str(err.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("REMEDIATION_MODE", "yolo"),
        ("MIN_INCIDENT_PRIORITY", "P9"),
        ("MAX_BODY_BYTES", "lots"),
        ("MAX_BODY_BYTES", "10"),
        ("PROMETHEUS_URL", "ftp://x"),
        ("K_SINK", "not a url"),
        # No request can be made to these (urllib3's LocationParseError at
        # the first send): refused at start, at deploy time.
        ("K_SINK", "http://" + "b" * 64 + ".example/default/incidents"),
        ("K_SINK", "http://broker..example/default/incidents"),
        ("K_SINK", "http://broker.example:99999/"),
        ("ALERTMANAGER_URL", "http://" + "a" * 64 + ".example:9093"),
        ("PAGERDUTY_EVENTS_URL", "https://events..pagerduty.com/v2/enqueue"),
        ("PROMETHEUS_URL", "http://" + "p" * 64 + ".example:9090"),
        ("SEVERITY_PRIORITY_MAP", "critical=P7"),
        ("METRICS_PUBLIC", "maybe"),
        ("DB_LOCK_TIMEOUT_SECONDS", "-1"),
        # At or above DB_TIMEOUT_SECONDS (10), the client's own timeout: it could never take effect.
        ("DB_STATEMENT_TIMEOUT_SECONDS", "10"),
        ("DB_SWEEP_STATEMENT_TIMEOUT_SECONDS", "30"),
        # Below it but within the margin (1 s of 10 s) the server's answer needs to arrive first.
        ("DB_LOCK_TIMEOUT_SECONDS", "9.5"),
        # Not durations; above PostgreSQL's largest timeout (2147483647 ms) every BEGIN would fail.
        ("DB_LOCK_TIMEOUT_SECONDS", "nan"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "inf"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "2147484"),
        ("DB_BOUNDS_ROLE", "sweeper"),
    ],
)
def test_each_bad_value_fails_with_its_name(name, value):
    with pytest.raises(ConfigError) as err:
        load_settings({**BASE, name: value})
    assert str(err.value).startswith(f"{name}:")


def test_secret_from_file_and_never_printed(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cr3t-value\n")
    s = load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(path)})
    assert s.api_token.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s.api_token)


def test_secret_file_problems_are_named(tmp_path):
    (tmp_path / "token").write_text("s3cr3t")
    with pytest.raises(ConfigError, match="^INCIDENT_API_TOKEN_FILE: cannot read .*missing: no such file"):
        load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="^INCIDENT_API_TOKEN_FILE: cannot read"):
        load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(tmp_path / "no-such-directory" / "token")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="not both"):
        load_settings({**BASE, "INCIDENT_API_TOKEN": "a", "INCIDENT_API_TOKEN_FILE": str(tmp_path / "empty")})


def kubelet_secret_volume(root, name: str, keys: dict[str, str]):
    """A directory laid out as the kubelet mounts a Secret: the keys in a
    timestamped directory, reached through the ``..data`` link."""
    volume = root / name
    stamped = volume / "..2026_11_29_22_40_00.000000001"
    stamped.mkdir(parents=True)
    (volume / "..data").symlink_to(stamped.name)
    for key, value in keys.items():
        (stamped / key).write_text(value)
        (volume / key).symlink_to(f"..data/{key}")
    return volume


def test_an_optional_secret_that_was_not_created_leaves_its_integration_off(tmp_path):
    # The manifests mark the integrations' Secrets optional; one not created
    # is mounted with no keys, and the function must still start.
    pagerduty = kubelet_secret_volume(tmp_path, "pagerduty-key", {})
    slack = kubelet_secret_volume(tmp_path, "slack-webhook", {"url": "https://hooks.slack.com/services/T/B/x"})
    s = load_settings({**BASE, "PAGERDUTY_ROUTING_KEY_FILE": str(pagerduty / "api_key"),
                       "SLACK_WEBHOOK_URL_FILE": str(slack / "url")})
    assert s.pagerduty_routing_key is None
    assert s.slack_webhook_url.reveal() == "https://hooks.slack.com/services/T/B/x"


def test_a_created_secret_without_the_key_is_still_an_error(tmp_path):
    pagerduty = kubelet_secret_volume(tmp_path, "pagerduty-key", {"routing_key": "R0123"})
    with pytest.raises(ConfigError, match="^PAGERDUTY_ROUTING_KEY_FILE: cannot read"):
        load_settings({**BASE, "PAGERDUTY_ROUTING_KEY_FILE": str(pagerduty / "api_key")})


def test_a_required_secret_that_was_not_created_is_named_as_missing(tmp_path):
    volume = kubelet_secret_volume(tmp_path, "incident-db", {})
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_settings({"DATABASE_URL_FILE": str(volume / "url")})


@pytest.mark.parametrize("name", ["SLACK_WEBHOOK_URL", "TEAMS_WEBHOOK_URL"])
def test_a_secret_url_no_request_can_be_made_to_fails_naming_the_variable_never_the_url(name):
    with pytest.raises(ConfigError) as err:
        load_settings({**BASE, name: "https://" + "s" * 64 + ".example/services/T/B/secret-123"})
    assert str(err.value) == f"{name}: a host name label is empty or over 63 characters"


@pytest.mark.parametrize("url", ["http://broker-ingress.knative-eventing.svc.cluster.local/default/incidents",
                                 "http://" + "b" * 63 + ".example./x", "http://[::1]:8080/x", "http://bücher.example/x",
                                 "http://10.0.0.1:80/x"])
def test_a_url_a_request_can_be_made_to_is_taken(url):
    assert load_settings({**BASE, "K_SINK": url}).k_sink == url.rstrip("/")


def test_a_url_setting_refused_at_start_never_quotes_its_password():
    with pytest.raises(ConfigError) as err:
        load_settings({**BASE, "PROMETHEUS_URL": "http://scraper:hunter2@" + "p" * 64 + ".example:9090"})
    assert "hunter2" not in str(err.value)
    assert str(err.value).startswith("PROMETHEUS_URL: ") and "scraper:***@" in str(err.value)


def test_slack_url_error_does_not_echo_the_secret():
    with pytest.raises(ConfigError) as err:
        load_settings({**BASE, "SLACK_WEBHOOK_URL": "hooks-secret-123"})
    assert "hooks-secret-123" not in str(err.value)


def test_severity_map_extends_the_defaults():
    s = load_settings({**BASE, "SEVERITY_PRIORITY_MAP": "warning=P2, sev1=P0"})
    assert s.severity_priority["warning"] == "P2"
    assert s.severity_priority["sev1"] == "P0"
    assert s.severity_priority["critical"] == "P0"


def test_secret_equality_and_bool():
    assert Secret("a") == Secret("a")
    assert not Secret("")


def test_database_url_may_come_from_a_file(tmp_path):
    path = tmp_path / "url"
    path.write_text("postgresql://app:pw@db:5432/incidents\n")
    s = load_settings({"DATABASE_URL_FILE": str(path)})
    assert s.database_url == "postgresql+pg8000://app:pw@db:5432/incidents"


@pytest.mark.parametrize("target, lock, statement", [("intake", 2.0, 5.0), ("query", 2.0, 8.0), ("escalation", 5.0, 8.0),
                                                     ("remediation", 5.0, 8.0), ("diagnostics", 5.0, 8.0),
                                                     ("deadletter", 5.0, 8.0), ("", 5.0, 8.0)])
def test_the_database_bounds_default_by_function_and_are_set_by_name(target, lock, statement):
    s = load_settings({**BASE, "FUNCTION_TARGET": target})
    assert (s.db_lock_timeout_seconds, s.db_statement_timeout_seconds, s.db_idle_in_transaction_timeout_seconds) == (lock, statement, 10.0)
    assert (s.db_sweep_lock_timeout_seconds, s.db_sweep_statement_timeout_seconds) == (1.0, 9.0)
    s = load_settings({**BASE, "FUNCTION_TARGET": target, "DB_LOCK_TIMEOUT_SECONDS": "0.5", "DB_STATEMENT_TIMEOUT_SECONDS": "0",
                       "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": "30", "DB_TIMEOUT_SECONDS": "20",
                       "DB_SWEEP_STATEMENT_TIMEOUT_SECONDS": "15"})
    assert (s.db_lock_timeout_seconds, s.db_statement_timeout_seconds, s.db_idle_in_transaction_timeout_seconds) == (0.5, 0.0, 30.0)
    assert s.db_sweep_statement_timeout_seconds == 15.0


def test_the_intake_events_service_has_the_bounds_of_a_function_the_broker_calls():
    """It runs the intake's code (FUNCTION_TARGET=intake) for the Broker and
    the PingSource, which retry: its row in deploy/services.py says so."""
    from deploy.services import SERVICES

    env = {**BASE, "FUNCTION_TARGET": SERVICES["intake-events"].function, **SERVICES["intake-events"].env}
    s = load_settings(env)
    assert (s.db_lock_timeout_seconds, s.db_statement_timeout_seconds) == (5.0, 8.0)
    s = load_settings({**BASE, "FUNCTION_TARGET": SERVICES["intake"].function, **SERVICES["intake"].env})
    assert (s.db_lock_timeout_seconds, s.db_statement_timeout_seconds) == (2.0, 5.0)


@pytest.mark.parametrize("target", ["intake", "query", "escalation"])
@pytest.mark.parametrize("client_timeout", ["3", "2", "0.3"])
def test_a_lowered_db_timeout_lowers_the_default_bounds_below_it(target, client_timeout):
    """A default the client's socket timeout would cut first (the query's
    8 s statements under DB_TIMEOUT_SECONDS=3) takes the largest value that
    leaves the server's answer its margin; an explicit one is refused."""
    from shared.config import bounds_margin

    timeout = float(client_timeout)
    s = load_settings({**BASE, "FUNCTION_TARGET": target, "DB_TIMEOUT_SECONDS": client_timeout})
    waits = (s.db_lock_timeout_seconds, s.db_statement_timeout_seconds, s.db_sweep_lock_timeout_seconds,
             s.db_sweep_statement_timeout_seconds)
    assert all(0 < wait <= timeout - bounds_margin(timeout) for wait in waits), waits
    assert bounds_margin(timeout) >= min(0.5, timeout / 2)
    with pytest.raises(ConfigError, match="^DB_STATEMENT_TIMEOUT_SECONDS: .* below DB_TIMEOUT_SECONDS"):
        load_settings({**BASE, "FUNCTION_TARGET": target, "DB_TIMEOUT_SECONDS": client_timeout,
                       "DB_STATEMENT_TIMEOUT_SECONDS": str(timeout - bounds_margin(timeout) / 2)})
