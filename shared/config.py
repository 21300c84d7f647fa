"""Every setting of the system, read from the environment.

Twelve-factor: nothing is read from anywhere else. A secret may also come
from the file named by ``<NAME>_FILE``, which is how Kubernetes mounts
Secrets. Invalid values fail at start-up with one line naming the variable,
and secrets are kept in :class:`Secret` so that a ``repr`` or a log line
never shows them.

A secret is declared once, on its field (``field(metadata=secret("NAME"))``):
:func:`load_settings` reads every declared secret from ``NAME`` or
``NAME_FILE``, and ``shared.bootstrap`` masks every one of them in logs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import Field, dataclass, field, fields
from typing import Any, Mapping
from urllib.parse import urlsplit

from shared.domain import PRIORITIES
from shared.users import UsersSource, hash_token

REMEDIATION_MODES = ("off", "dry-run", "approve", "live")

# Severity label values as kube-prometheus and common rule sets use them.
DEFAULT_SEVERITY_PRIORITY = {
    "critical": "P0",
    "page": "P0",
    "high": "P1",
    "error": "P1",
    "warning": "P1",
    "major": "P1",
    "info": "P2",
    "low": "P2",
    "minor": "P2",
}


# How long a transaction of each function may wait on the database, in
# seconds (shared/db.py Bounds; docs/deploy.md): lock_timeout,
# statement_timeout, idle_in_transaction_session_timeout, by the role of
# the process (DB_BOUNDS_ROLE, else the function FUNCTION_TARGET names: the
# intake-events service runs the intake's code but is called by the Broker
# and the PingSource, deploy/services.py). The wait bounds stay below
# DB_TIMEOUT_SECONDS (10), the client's own socket timeout, by a margin
# (bounds_margin), so the server ends the wait and says why (a 503 on a
# connection still usable) before the client would give up on it. The
# intake answers AlertManager: a lock held by a migration or a stuck
# transaction gets a 503 within seconds, well inside AlertManager's
# notification timeout, and AlertManager retries. The query
# API's reads include /metrics (computed at scrape time: Prometheus's
# scrape timeout is 10 s) and the board's pages. The functions the Broker
# calls wait longer for a lock: the Broker retries them a few times with a
# backoff, then dead-letters, so a short maintenance lock should not cost
# them a retry; their Knative timeouts (30 to 300 s) leave room. No
# transaction of any function waits on anything but the database (no HTTP
# call holds one), so 10 s idle in a transaction means a request stuck in
# this process, whose row locks the other replicas are waiting for.
DB_BOUNDS = {
    "intake": (2.0, 5.0, 10.0),
    "query": (2.0, 8.0, 10.0),
}
DB_BOUNDS_BROKER_CALLED = (5.0, 8.0, 10.0)
# The sweep (PingSource, POST /outbox/sweep): retention's batched deletes,
# reconciliation's scan and the noise sweep may take longer per statement
# than a request's, but must not sit waiting on a lock while holding their
# own, which requests are waiting for: the next sweep (a minute later) tries
# again.
DB_SWEEP_BOUNDS = (1.0, 9.0)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A secret value that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def secret(env: str, url: bool = False) -> dict[str, Any]:
    """Field metadata declaring a secret setting read from ``env`` (or
    ``env_FILE``); ``url``: it must be an http(s) URL (the URL is the secret)."""
    return {"secret": True, "env": env, "url": url}


def secret_fields(settings_class: type) -> list[Field]:
    """Every field declared with :func:`secret`, in declaration order."""
    return [f for f in fields(settings_class) if f.metadata.get("secret")]


def _get(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip()


def _mount_without_keys(path: str) -> bool:
    """Whether ``path``'s directory is a Secret volume with no keys: what
    Kubernetes mounts for a Secret marked ``optional`` that was not created
    (the manifests mark the integrations' Secrets so). Its only entries are
    the kubelet's own ``..data`` and ``..<timestamp>``, if any. A directory
    that holds other keys means a misspelt key, which stays an error."""
    try:
        entries = os.listdir(os.path.dirname(path) or ".")
    except OSError:
        return False
    return not any(not entry.startswith("..") for entry in entries)


def read_secret(env: Mapping[str, str], name: str) -> Secret | None:
    """``NAME`` or the contents of the file named by ``NAME_FILE``; unset when
    that file is in a Secret volume with no keys (_mount_without_keys)."""
    direct = env.get(name, "")
    path = env.get(f"{name}_FILE", "").strip()
    if direct and path:
        raise ConfigError(f"{name}: set either {name} or {name}_FILE, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except FileNotFoundError:
            if _mount_without_keys(path):
                return None
            raise ConfigError(f"{name}_FILE: cannot read {path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{name}_FILE: {path} is empty")
        return Secret(value)
    value = direct.strip()
    return Secret(value) if value else None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name}: must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0,
           maximum: float = math.inf) -> float:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf"; neither is a duration
        raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    if value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum:.15g}, got {value:.15g}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name).lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...], upper: bool = False) -> str:
    raw = _get(env, name, default)
    value = raw.upper() if upper else raw.lower()
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _share(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default, minimum=0.0)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}: must be a share above 0 and at most 1 (0.5 is half), got {value:g}")
    return value


def _csv(env: Mapping[str, str], name: str, default: str = "") -> tuple[str, ...]:
    raw = env.get(name, default)
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def unrequestable(url: str) -> str | None:
    """Why no request can be made to ``url``, or None: not http(s), no host,
    a port out of range, a host name label empty or over 63 characters (its
    IDNA form: what urllib3 and the TLS handshake refuse, a
    ``LocationParseError`` or ``UnicodeError`` at the first send). The
    senders say the same at run time (shared.deadline.UNUSABLE_URL); here a
    setting fails the start, at deploy time. Standard library only: this
    runs on every function's start path."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError:
        return "its port (or IPv6 address) cannot be read"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "expected an http(s) URL"
    host = parts.hostname or ""
    if not host:
        return "no host in the URL"
    if ":" in host:
        return None  # an IPv6 address: urlsplit has checked its brackets
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    for label in labels:
        size = len(label) if label.isascii() else len("xn--") + len(label.encode("punycode"))
        if not 1 <= size <= 63:
            return "a host name label is empty or over 63 characters"
    return None


def _http_url(env: Mapping[str, str], name: str, default: str = "") -> str:
    raw = _get(env, name, default)
    if not raw:
        return ""
    why = unrequestable(raw)
    if why:
        raise ConfigError(f"{name}: {why}, got {_without_password(raw)!r}")
    return raw.rstrip("/")


def _without_password(url: str) -> str:
    """``url`` to quote in an error: a password in it (Prometheus or
    AlertManager behind basic auth) never reaches a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def parse_database_url(raw: str, name: str = "DATABASE_URL") -> str:
    """Accept ``postgresql+pg8000://`` (and plain ``postgresql://``, rewritten)."""
    if not raw:
        raise ConfigError(f"{name}: not set; expected postgresql+pg8000://user@host:port/database")
    parts = urlsplit(raw)
    if parts.scheme in ("postgresql", "postgres"):
        raw = "postgresql+pg8000" + raw[len(parts.scheme):]
        parts = urlsplit(raw)
    if parts.scheme != "postgresql+pg8000":
        raise ConfigError(
            f"{name}: unsupported scheme {parts.scheme!r}; expected postgresql+pg8000://user@host:port/database"
        )
    if not parts.path.strip("/"):
        raise ConfigError(f"{name}: no database name in the URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{name}: malformed port in the URL") from None
    if not parts.hostname and "unix_sock=" not in parts.query:
        raise ConfigError(f"{name}: no host in the URL (or unix_sock=... in the query)")
    return raw


def _database_url(env: Mapping[str, str]) -> str:
    """DATABASE_URL or DATABASE_URL_FILE: the URL carries the password."""
    secret = read_secret(env, "DATABASE_URL")
    return parse_database_url(secret.reveal() if secret else "")


def _severity_map(env: Mapping[str, str]) -> dict[str, str]:
    mapping = dict(DEFAULT_SEVERITY_PRIORITY)
    raw = _get(env, "SEVERITY_PRIORITY_MAP")
    if not raw:
        return mapping
    for item in raw.split(","):
        if not item.strip():
            continue
        severity, sep, priority = item.partition("=")
        priority = priority.strip().upper()
        if not sep or not severity.strip() or priority not in PRIORITIES:
            raise ConfigError(
                f"SEVERITY_PRIORITY_MAP: expected severity=P0|P1|P2 pairs separated by commas, got {item.strip()!r}"
            )
        mapping[severity.strip().lower()] = priority
    return mapping


@dataclass(frozen=True)
class Settings:
    database_url: str
    api_token: Secret | None = field(metadata=secret("INCIDENT_API_TOKEN"))
    k_sink: str
    event_source: str
    public_url: str
    prometheus_url: str
    pagerduty_events_url: str
    pagerduty_routing_key: Secret | None = field(metadata=secret("PAGERDUTY_ROUTING_KEY"))
    slack_webhook_url: Secret | None = field(metadata=secret("SLACK_WEBHOOK_URL", url=True))
    remediation_mode: str
    remediation_allowed_namespaces: tuple[str, ...]
    playbooks_file: str
    min_incident_priority: str
    severity_priority: dict[str, str] = field(repr=False)
    ignored_severities: tuple[str, ...] = ()
    ignored_alertnames: tuple[str, ...] = ()
    # Alert names counted apart in ignored_alerts / alerts_ignored_total (shared/ignored_alerts.py).
    ignored_alerts_max_names: int = 50
    max_body_bytes: int = 1024 * 1024
    db_pool_size: int = 4
    db_max_overflow: int = 4
    db_timeout_seconds: float = 10.0
    # Bounds on each transaction's waits (DB_BOUNDS above); 0 leaves the server's setting.
    db_lock_timeout_seconds: float = 2.0
    db_statement_timeout_seconds: float = 5.0
    db_idle_in_transaction_timeout_seconds: float = 10.0
    db_sweep_lock_timeout_seconds: float = 1.0
    db_sweep_statement_timeout_seconds: float = 9.0
    publish_timeout_seconds: float = 5.0
    metrics_public: bool = False
    events_require_token: bool = True
    diagnostics_file: str = ""
    correlation_file: str = ""
    correlation_topology_timeout_seconds: float = 2.0
    remediation_denied_targets: tuple[str, ...] = ()
    remediation_max_replicas: int = 20
    remediation_cooldown_seconds: int = 900
    remediation_max_actions_per_hour: int = 20
    remediation_verify_timeout_seconds: float = 120.0
    remediation_allow_node_actions: bool = False
    # Blast radius: the most one action may change (functions/remediation/actions.py).
    remediation_max_replica_change: int = 10
    remediation_max_pods_deleted: int = 10
    remediation_max_pods_deleted_share: float = 0.5
    # Approval and verification (functions/remediation/proposals.py, verify.py).
    remediation_approval_ttl_seconds: int = 3600
    remediation_approvers: tuple[str, ...] = ()
    remediation_verify_window_seconds: float = 60.0
    remediation_db_dsn: Secret | None = field(default=None, metadata=secret("REMEDIATION_DB_DSN"))
    reopen_window_seconds: int = 1800
    cluster_name: str = "kubernetes"
    pagerduty_severity: dict = field(default_factory=dict)
    page_on_open_priorities: tuple[str, ...] = ("P0",)
    page_on_failure_priorities: tuple[str, ...] = ("P0", "P1")
    notify_timeout_seconds: float = 5.0
    notify_max_attempts: int = 4
    notify_max_retry_after_seconds: float = 30.0
    probe_timeout_seconds: float = 3.0
    diagnostics_deadline_seconds: float = 10.0
    actor_header: str = "X-Actor"
    log_level: str = "INFO"
    # Event publishing (the outbox)
    outbox_max_attempts: int = 8
    # Reconciliation of incidents stuck between steps (shared/reconcile.py).
    reconcile_grace_seconds: float = 300.0
    reconcile_max_reemits: int = 3
    reconcile_backoff_seconds: float = 300.0
    reconcile_horizon_seconds: float = 86400.0
    reconcile_batch: int = 100
    # How often a stuck escalation step of an active, unacknowledged incident
    # is re-sent after its re-emissions are spent; None: the longest backoff.
    reconcile_stuck_resend_seconds: float | None = None
    # Retention of what grows with every event (shared/retention.py); 0 keeps forever.
    retention_outbox_hours: float = 168.0
    retention_claims_hours: float = 168.0
    retention_timeline_days: float = 365.0
    retention_suppressed_days: float = 30.0
    retention_ignored_days: float = 30.0
    retention_batch: int = 1000
    retention_max_batches: int = 20
    # Notification channels (functions/escalation/channels/).
    announce_on_open_priorities: tuple[str, ...] = ("P0", "P1")
    teams_webhook_url: Secret | None = field(default=None, metadata=secret("TEAMS_WEBHOOK_URL", url=True))
    outgoing_webhook_url: Secret | None = field(default=None, metadata=secret("OUTGOING_WEBHOOK_URL", url=True))
    outgoing_webhook_secret: Secret | None = field(default=None, metadata=secret("OUTGOING_WEBHOOK_SECRET"))
    # Noise control (docs/noise-control.md).
    flap_threshold: int = 4
    flap_window_seconds: int = 600
    flap_quiet_seconds: int = 900
    heartbeat_alertnames: tuple[str, ...] = ("Watchdog",)
    heartbeat_timeout_seconds: int = 600
    alertmanager_url: str = ""
    # Personal API tokens (shared/users.py): hashes only, so not a masked secret.
    api_users: UsersSource = field(default_factory=UsersSource)
    # Failed board sign-ins (shared/login_throttle.py).
    login_max_failures: int = 5
    login_max_failures_total: int = 50
    login_failure_window_seconds: int = 300
    trusted_proxy_hops: int = 0
    # A personal board session unused this long ends (shared/board_sessions.py); 0: only the 12 h cap.
    board_idle_timeout_minutes: int = 0

    def priority_opens_incident(self, priority: str) -> bool:
        return PRIORITIES.index(priority) <= PRIORITIES.index(self.min_incident_priority)

    def stuck_resend_seconds(self) -> float:
        """``RECONCILE_STUCK_RESEND_SECONDS``, or else the longest backoff
        (the wait after the last re-emission), at least a second."""
        if self.reconcile_stuck_resend_seconds is not None:
            return self.reconcile_stuck_resend_seconds
        return max(1.0, self.reconcile_backoff_seconds * 2 ** max(self.reconcile_max_reemits - 1, 0))


def load_settings(env: Mapping[str, str] | None = None, settings_class: type[Settings] = Settings) -> Settings:
    """Read every setting; raise :class:`ConfigError` naming the first bad one."""
    env = os.environ if env is None else env
    secrets = _secrets(env, settings_class)
    config = settings_class(
        database_url=_database_url(env),
        **secrets,
        k_sink=_http_url(env, "K_SINK"),
        event_source=_get(env, "EVENT_SOURCE", "/incident-response") or "/incident-response",
        public_url=_http_url(env, "PUBLIC_URL", "http://localhost:8080"),
        prometheus_url=_http_url(env, "PROMETHEUS_URL"),
        pagerduty_events_url=_http_url(env, "PAGERDUTY_EVENTS_URL", "https://events.pagerduty.com/v2/enqueue"),
        remediation_mode=_choice(env, "REMEDIATION_MODE", "dry-run", REMEDIATION_MODES),
        remediation_allowed_namespaces=_csv(env, "REMEDIATION_ALLOWED_NAMESPACES"),
        playbooks_file=_get(env, "PLAYBOOKS_FILE"),
        min_incident_priority=_choice(env, "MIN_INCIDENT_PRIORITY", "P1", PRIORITIES, upper=True),
        severity_priority=_severity_map(env),
        ignored_severities=tuple(s.lower() for s in _csv(env, "IGNORED_SEVERITIES", "none")),
        ignored_alertnames=_csv(env, "IGNORED_ALERTNAMES", "Watchdog,InfoInhibitor"),
        ignored_alerts_max_names=_int(env, "IGNORED_ALERTS_MAX_NAMES", 50, minimum=1, maximum=10000),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
        db_pool_size=_int(env, "DB_POOL_SIZE", 4, minimum=1, maximum=100),
        db_max_overflow=_int(env, "DB_MAX_OVERFLOW", 4, minimum=0, maximum=100),
        db_timeout_seconds=_float(env, "DB_TIMEOUT_SECONDS", 10.0, minimum=0.1),
        **_db_bounds(env),
        publish_timeout_seconds=_float(env, "PUBLISH_TIMEOUT_SECONDS", 5.0, minimum=0.1),
        metrics_public=_bool(env, "METRICS_PUBLIC", False),
        events_require_token=_bool(env, "EVENTS_REQUIRE_TOKEN", True),
        diagnostics_file=_get(env, "DIAGNOSTICS_FILE"),
        correlation_file=_get(env, "CORRELATION_FILE"),
        correlation_topology_timeout_seconds=_float(env, "CORRELATION_TOPOLOGY_TIMEOUT_SECONDS", 2.0, minimum=0.1),
        remediation_denied_targets=_csv(env, "REMEDIATION_DENIED_TARGETS", "kube-system/*"),
        remediation_max_replicas=_int(env, "REMEDIATION_MAX_REPLICAS", 20, minimum=1, maximum=1000),
        remediation_cooldown_seconds=_int(env, "REMEDIATION_COOLDOWN_SECONDS", 900, minimum=0),
        remediation_max_actions_per_hour=_int(env, "REMEDIATION_MAX_ACTIONS_PER_HOUR", 20, minimum=0),
        remediation_verify_timeout_seconds=_float(env, "REMEDIATION_VERIFY_TIMEOUT_SECONDS", 120.0, minimum=0.0),
        remediation_allow_node_actions=_bool(env, "REMEDIATION_ALLOW_NODE_ACTIONS", False),
        remediation_max_replica_change=_int(env, "REMEDIATION_MAX_REPLICA_CHANGE", 10, minimum=1, maximum=1000),
        remediation_max_pods_deleted=_int(env, "REMEDIATION_MAX_PODS_DELETED", 10, minimum=1, maximum=1000),
        remediation_max_pods_deleted_share=_share(env, "REMEDIATION_MAX_PODS_DELETED_SHARE", 0.5),
        remediation_approval_ttl_seconds=_int(env, "REMEDIATION_APPROVAL_TTL_SECONDS", 3600, minimum=1),
        remediation_approvers=_csv(env, "REMEDIATION_APPROVERS"),
        remediation_verify_window_seconds=_float(env, "REMEDIATION_VERIFY_WINDOW_SECONDS", 60.0, minimum=0.0),
        reopen_window_seconds=_int(env, "REOPEN_WINDOW_SECONDS", 1800, minimum=0),
        cluster_name=_get(env, "CLUSTER_NAME", "kubernetes") or "kubernetes",
        pagerduty_severity=_pagerduty_severity(env),
        page_on_open_priorities=_priorities(env, "PAGE_ON_OPEN_PRIORITIES", "P0"),
        page_on_failure_priorities=_priorities(env, "PAGE_ON_FAILURE_PRIORITIES", "P0,P1"),
        notify_timeout_seconds=_float(env, "NOTIFY_TIMEOUT_SECONDS", 5.0, minimum=0.1),
        notify_max_attempts=_int(env, "NOTIFY_MAX_ATTEMPTS", 4, minimum=1, maximum=20),
        notify_max_retry_after_seconds=_float(env, "NOTIFY_MAX_RETRY_AFTER_SECONDS", 30.0, minimum=0.0),
        probe_timeout_seconds=_float(env, "PROBE_TIMEOUT_SECONDS", 3.0, minimum=0.1),
        diagnostics_deadline_seconds=_float(env, "DIAGNOSTICS_DEADLINE_SECONDS", 10.0, minimum=0.5),
        actor_header=_get(env, "ACTOR_HEADER", "X-Actor") or "X-Actor",
        log_level=_choice(env, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        # Event publishing (the outbox)
        outbox_max_attempts=_int(env, "OUTBOX_MAX_ATTEMPTS", 8, minimum=1, maximum=100),
        # Reconciliation of incidents stuck between steps (shared/reconcile.py).
        reconcile_grace_seconds=_float(env, "RECONCILE_GRACE_SECONDS", 300.0, minimum=0.0),
        reconcile_max_reemits=_int(env, "RECONCILE_MAX_REEMITS", 3, minimum=0, maximum=20),
        reconcile_backoff_seconds=_float(env, "RECONCILE_BACKOFF_SECONDS", 300.0, minimum=0.0),
        reconcile_horizon_seconds=_float(env, "RECONCILE_HORIZON_SECONDS", 86400.0, minimum=60.0),
        reconcile_batch=_int(env, "RECONCILE_BATCH", 100, minimum=1, maximum=10000),
        reconcile_stuck_resend_seconds=_float(env, "RECONCILE_STUCK_RESEND_SECONDS", None, minimum=1.0),
        # Retention (shared/retention.py, run by the sweep; docs/configuration.md).
        retention_outbox_hours=_float(env, "RETENTION_OUTBOX_HOURS", 168.0, minimum=0.0),
        retention_claims_hours=_float(env, "RETENTION_CLAIMS_HOURS", 168.0, minimum=0.0),
        retention_timeline_days=_float(env, "RETENTION_TIMELINE_DAYS", 365.0, minimum=0.0),
        retention_suppressed_days=_float(env, "RETENTION_SUPPRESSED_DAYS", 30.0, minimum=0.0),
        retention_ignored_days=_float(env, "RETENTION_IGNORED_DAYS", 30.0, minimum=0.0),
        retention_batch=_int(env, "RETENTION_BATCH", 1000, minimum=1, maximum=100000),
        retention_max_batches=_int(env, "RETENTION_MAX_BATCHES", 20, minimum=1, maximum=10000),
        # Notification channels (functions/escalation/channels/).
        announce_on_open_priorities=_priorities(env, "ANNOUNCE_ON_OPEN_PRIORITIES", "P0,P1"),
        # Noise control (docs/noise-control.md).
        flap_threshold=_int(env, "FLAP_THRESHOLD", 2, minimum=2, maximum=1000),
        flap_window_seconds=_int(env, "FLAP_WINDOW_SECONDS", 600, minimum=1),
        flap_quiet_seconds=_int(env, "FLAP_QUIET_SECONDS", 600, minimum=1),
        heartbeat_alertnames=_csv(env, "HEARTBEAT_ALERTNAMES", "Watchdog"),
        heartbeat_timeout_seconds=_int(env, "HEARTBEAT_TIMEOUT_SECONDS", 600, minimum=1),
        alertmanager_url=_http_url(env, "ALERTMANAGER_URL"),
        api_users=_api_users(env, secrets.get("api_token")),
        login_max_failures=_sign_in_limit(env, "LOGIN_MAX_FAILURES", 5, maximum=1000),
        login_max_failures_total=_sign_in_limit(env, "LOGIN_MAX_FAILURES_TOTAL", 50, maximum=100000),
        login_failure_window_seconds=_sign_in_limit(env, "LOGIN_FAILURE_WINDOW_SECONDS", 300, maximum=86400),
        trusted_proxy_hops=trusted_proxy_hops(env, warn=True),
        board_idle_timeout_minutes=_idle_minutes(env),
    )
    _check_paging(config)
    return config


# PostgreSQL's largest value for a timeout setting (an int of milliseconds):
# a larger one makes the server refuse every BEGIN that sets it (22023).
PG_MAX_TIMEOUT_SECONDS = 2147483.647


def bounds_margin(client_timeout: float) -> float:
    """How far below DB_TIMEOUT_SECONDS a wait bound must stay: 0.5 s or
    10 % of it, whichever is larger, but at most half of it. The server's
    error must travel back and be read before the client's socket timeout
    gives up on the same read (a loaded replica's thread may wait for the
    GIL for a while before it reads)."""
    return min(max(0.5, 0.1 * client_timeout), 0.5 * client_timeout)


DB_BOUNDS_ROLES = ("intake", "query", "broker-called")


def _db_bounds(env: Mapping[str, str]) -> dict[str, float]:
    """The transaction bounds, each defaulting to the one of the function's
    role (DB_BOUNDS_ROLE, else the function FUNCTION_TARGET names; DB_BOUNDS).

    The wait bounds (lock, statement, the sweep's) take effect only below
    DB_TIMEOUT_SECONDS, the client's socket timeout, which would otherwise
    end the wait first while the server goes on waiting: a default is
    lowered to DB_TIMEOUT_SECONDS less :func:`bounds_margin`, and a value
    set above that is refused. The idle bound is not a wait of the client
    (it is how long the client may send nothing) and is not compared. Every
    bound must be a finite number of seconds no larger than PostgreSQL's
    maximum."""
    role = _get(env, "DB_BOUNDS_ROLE")
    if role and role not in DB_BOUNDS_ROLES:
        raise ConfigError(f"DB_BOUNDS_ROLE: expected one of {', '.join(DB_BOUNDS_ROLES)}, got {role!r}")
    lock, statement, idle = DB_BOUNDS.get(role or _get(env, "FUNCTION_TARGET"), DB_BOUNDS_BROKER_CALLED)
    sweep_lock, sweep_statement = DB_SWEEP_BOUNDS
    client_timeout = _float(env, "DB_TIMEOUT_SECONDS", 10.0, minimum=0.1)
    margin = bounds_margin(client_timeout)
    limit = client_timeout - margin
    waits = {"DB_LOCK_TIMEOUT_SECONDS": lock, "DB_STATEMENT_TIMEOUT_SECONDS": statement,
             "DB_SWEEP_LOCK_TIMEOUT_SECONDS": sweep_lock, "DB_SWEEP_STATEMENT_TIMEOUT_SECONDS": sweep_statement}
    values = {}
    for name, default in waits.items():
        value = _float(env, name, min(default, limit), maximum=PG_MAX_TIMEOUT_SECONDS)
        if value > limit:
            raise ConfigError(f"{name}: {value:g} s is not at least {margin:g} s below DB_TIMEOUT_SECONDS ({client_timeout:g} s), "
                              "the client's own timeout, which would end the wait first; lower it (0 leaves the server's setting)")
        values[name] = value
    values["DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS"] = _float(env, "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", idle,
                                                              maximum=PG_MAX_TIMEOUT_SECONDS)
    return {name[:-len("_SECONDS")].lower() + "_seconds": value for name, value in values.items()}


def _secrets(env: Mapping[str, str], settings_class: type) -> dict[str, Secret | None]:
    """Every declared secret, read from its variable or its ``_FILE``."""
    values = {}
    for f in secret_fields(settings_class):
        name = f.metadata["env"]
        value = read_secret(env, name)
        if value is not None and f.metadata.get("url"):
            why = unrequestable(value.reveal())
            if why:
                # The URL is the secret: name the variable, never the value.
                raise ConfigError(f"{name}: {why}")
        values[f.name] = value
    return values


# The roles that read the query's own settings: the query, and a process of
# no function (a test, a tool), which reads every setting as strictly.
QUERY_ROLES = ("", "query")


def _query_only(env: Mapping[str, str], name: str, read, default, ignored: str, warn: bool = True):
    """A setting only the query function uses, in the ConfigMap every
    function shares: a wrong value stops the query (the error names the
    variable), and elsewhere is warned (``ignored``: what that leaves) and
    read as ``default``, so that a typo in it never stops paging."""
    try:
        return read()
    except ConfigError as exc:
        if _get(env, "FUNCTION_TARGET") in QUERY_ROLES:
            raise
        if warn:
            # The error in the line itself: logging is configured after the settings are read.
            logging.getLogger("config").warning(f"{name} ignored here: {ignored} ({exc})", extra={"error": str(exc)})
        return default


def _sign_in_limit(env: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    """A limit of failed board sign-ins (shared/login_throttle.py): the query's alone."""
    return _query_only(env, name, lambda: _int(env, name, default, minimum=1, maximum=maximum), default,
                       "only the query's board sign-in reads it")


def trusted_proxy_hops(env: Mapping[str, str], warn: bool = False) -> int:
    """TRUSTED_PROXY_HOPS, read the one way both the settings and the server
    (shared/serve.py, which reads it before any settings exist) read it. The
    query counts sign-ins by the address it gives, so a wrong value stops the
    query; any other function only logs that address and, warned by its
    settings, is served with the connection's own (0)."""
    return _query_only(env, "TRUSTED_PROXY_HOPS", lambda: _int(env, "TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10), 0,
                       "requests are served and logged with the connection's own address", warn=warn)


# The shortest idle timeout a board session may have (shared/board_sessions.py
# reads it from here: the settings are loaded before SQLAlchemy is imported).
IDLE_MINIMUM_MINUTES = 5


def _idle_minutes(env: Mapping[str, str]) -> int:
    """BOARD_IDLE_TIMEOUT_MINUTES: 0 (none), or 5 minutes to the session's 12
    hours. The query ends idle sessions by it, and the intake's retention
    sweep deletes their rows by it: one value for both, in the shared
    ConfigMap. A wrong value stops the query (whose setting it is) and no
    other function: elsewhere it is only the sweep's, which then deletes
    expired sessions alone (warned), and paging goes on."""

    def read() -> int:
        value = _int(env, "BOARD_IDLE_TIMEOUT_MINUTES", 0, minimum=0, maximum=12 * 60)
        if 0 < value < IDLE_MINIMUM_MINUTES:
            raise ConfigError(f"BOARD_IDLE_TIMEOUT_MINUTES: 0 (none) or at least {IDLE_MINIMUM_MINUTES}, got {value}")
        return value

    return _query_only(env, "BOARD_IDLE_TIMEOUT_MINUTES", read, 0,
                       "the retention sweep deletes expired board sessions only")


def _api_users(env: Mapping[str, str], api_token: Secret | None) -> UsersSource:
    """INCIDENT_API_USERS or INCIDENT_API_USERS_FILE (shared/users.py), not
    parsed here: only the query function reads the list (at its start), so a
    mistake in it stops that function alone."""
    text = env.get("INCIDENT_API_USERS", "")
    path = env.get("INCIDENT_API_USERS_FILE", "").strip()
    if text.strip() and path:
        raise ConfigError("INCIDENT_API_USERS: set either INCIDENT_API_USERS or INCIDENT_API_USERS_FILE, not both")
    return UsersSource(text=text, path=path or None, forbidden=hash_token(api_token.reveal()) if api_token else None)


def _check_paging(config: Settings) -> None:
    """Paging is decided by the settings alone (every transition reaches
    escalation), so a setting that can never take effect is an error, not a
    silent no-op."""
    never = [p for p in config.page_on_open_priorities if not config.priority_opens_incident(p)]
    if never:
        raise ConfigError(f"PAGE_ON_OPEN_PRIORITIES: {never[0]} incidents never open, because MIN_INCIDENT_PRIORITY is "
                          f"{config.min_incident_priority}; lower MIN_INCIDENT_PRIORITY or drop {never[0]}")
    if 0 < config.retention_claims_hours * 3600 < config.reconcile_horizon_seconds:
        raise ConfigError("RETENTION_CLAIMS_HOURS: shorter than RECONCILE_HORIZON_SECONDS; reconciliation would take a pruned "
                          "step for a missing one and re-emit its event; keep claims at least as long as the horizon")
    if bool(config.outgoing_webhook_url) != bool(config.outgoing_webhook_secret):
        raise ConfigError("OUTGOING_WEBHOOK_URL and OUTGOING_WEBHOOK_SECRET: set both (every request is signed) or neither")


PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")


def _pagerduty_severity(env: Mapping[str, str]) -> dict[str, str]:
    mapping = {"P0": "critical", "P1": "error", "P2": "warning"}
    raw = _get(env, "PAGERDUTY_SEVERITY_MAP")
    for item in filter(None, (i.strip() for i in raw.split(","))):
        priority, sep, severity = item.partition("=")
        priority, severity = priority.strip().upper(), severity.strip().lower()
        if not sep or priority not in PRIORITIES or severity not in PAGERDUTY_SEVERITIES:
            raise ConfigError(f"PAGERDUTY_SEVERITY_MAP: expected P0|P1|P2=critical|error|warning|info pairs, got {item!r}")
        mapping[priority] = severity
    return mapping


def _priorities(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    values = tuple(v.upper() for v in _csv(env, name, default))
    bad = [v for v in values if v not in PRIORITIES]
    if bad:
        raise ConfigError(f"{name}: unknown priority {bad[0]!r}; allowed: {', '.join(PRIORITIES)}")
    return values


_cached: Settings | None = None


def settings() -> Settings:
    """The process-wide settings, read once."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings_cache() -> None:
    global _cached
    _cached = None
