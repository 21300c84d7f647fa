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
    with pytest.raises(ConfigError, match="^INCIDENT_API_TOKEN_FILE: cannot read"):
        load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({**BASE, "INCIDENT_API_TOKEN_FILE": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="not both"):
        load_settings({**BASE, "INCIDENT_API_TOKEN": "a", "INCIDENT_API_TOKEN_FILE": str(tmp_path / "empty")})


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
