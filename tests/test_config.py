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
