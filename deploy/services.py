"""The one table of the system's services: what the manifest generator writes
as Knative Services and what ``make run`` starts as local processes, so the
two cannot disagree about which functions exist, who publishes events or which
service accepts events without the API token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Service:
    function: str  # the functions/<function>/main.py it runs
    account: str  # Kubernetes service account
    public: bool  # reachable from outside the cluster (else cluster-local)
    publishes: bool  # sends incident events to the Broker (gets K_SINK)
    concurrency: int
    timeout: int  # seconds
    memory: str
    port: int  # default local port of `make run`
    port_variable: str  # env variable that overrides it
    # Settings fixed per service, the same in Knative and in `make run`.
    env: dict[str, str] = field(default_factory=dict)
    # Replicas the production overlay keeps warm (min-scale); 0 scales to zero.
    warm: int = 0


SERVICES: dict[str, Service] = {
    # incident-intake reads pods and their owners for topology correlation.
    "intake": Service("intake", "incident-intake", True, True, 8, 30, "192Mi", 8081, "INTAKE_PORT", warm=2),
    # Only the Broker and the PingSource call it (cluster-local), so it
    # accepts events without the API token; both retry, so its transactions
    # get the bounds of the functions the Broker calls (shared/config.py).
    "intake-events": Service("intake", "incident-intake", False, True, 8, 60, "192Mi", 8086, "INTAKE_EVENTS_PORT",
                             env={"EVENTS_REQUIRE_TOKEN": "false", "DB_BOUNDS_ROLE": "broker-called"}),
    # The seed's AC4: two running replicas of what alerts and engineers hit.
    "query": Service("query", "incident-response", True, True, 8, 30, "192Mi", 8080, "QUERY_PORT", warm=2),
    "diagnostics": Service("diagnostics", "incident-diagnostics", False, False, 4, 60, "256Mi", 8082, "DIAGNOSTICS_PORT"),
    "remediation": Service("remediation", "incident-remediation", False, True, 2, 300, "256Mi", 8083, "REMEDIATION_PORT"),
    "escalation": Service("escalation", "incident-response", False, False, 4, 120, "192Mi", 8084, "ESCALATION_PORT"),
    "deadletter": Service("deadletter", "incident-response", False, False, 4, 30, "192Mi", 8085, "DEADLETTER_PORT"),
}

MAX_SCALE = 10
# The seed's name for the engineers' API (its Tests 1 and 6): a ClusterIP
# Service in front of the query function's pods, on the seed's port.
SEED_API_SERVICE = "incident-api"
SEED_API_PORT = 8080
SEED_API_FUNCTION = "query"
