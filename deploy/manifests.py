"""``make manifests``: writes the generated parts of ``knative/base`` from one
table, so the seven Knative Services cannot drift apart; ``make
check-manifests`` (and the test suite) fail when a generated file is stale.

Generated: ``services.yaml``, ``networkpolicy.yaml`` (who may call the
cluster-local functions), the ConfigMap copies of the shipped playbooks
and probes under ``config/`` (kustomize may not read files outside its
folder), the production overlay (its warm replicas and the seed's
``incident-api`` Service), and knative/monitoring's PrometheusRule and
Grafana dashboard (deploy/monitoring.py). deploy/kn.py writes the same table as ``kn``
commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from deploy import monitoring
from deploy.services import MAX_SCALE, SEED_API_FUNCTION, SEED_API_PORT, SEED_API_SERVICE, SERVICES

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "knative" / "base"
PRODUCTION = ROOT / "knative" / "overlays" / "production"
SECRETS = "/var/run/secrets/incident-response"
# The board's sign-in limit counts by the client's address, which the query
# reads TRUSTED_PROXY_HOPS entries from the right of X-Forwarded-For. The
# activator adds an entry when it is in the path, which with Knative's
# default burst capacity (200 requests) it always is for a Service this
# small, and then only sometimes as replicas are added: a burst capacity of
# 0 keeps it out except at scale from zero, so the entries stay the same.
STABLE_HOPS = {"query"}
# And the number of X-Forwarded-For entries on that path, so the sign-in
# limit counts by the client's address instead of the queue-proxy's (one
# address for everybody, with the default 0): a Knative ingress gateway that
# appends (Kourier, Istio), then the queue-proxy (docs/deploy.md says how to
# check it; a load balancer in front that appends needs one more).
PROXY_HOPS = {"query": "2"}


# Secret name -> (key, env var of the *_FILE setting, who needs it).
SECRET_MOUNTS = {
    "incident-db": ("url", "DATABASE_URL_FILE", set(SERVICES)),
    "incident-api-token": ("token", "INCIDENT_API_TOKEN_FILE", {"intake", "intake-events", "query"}),
    "pagerduty-key": ("api_key", "PAGERDUTY_ROUTING_KEY_FILE", {"escalation"}),
    "slack-webhook": ("url", "SLACK_WEBHOOK_URL_FILE", {"escalation"}),
    "teams-webhook": ("url", "TEAMS_WEBHOOK_URL_FILE", {"escalation"}),
    "outgoing-webhook": ("url", "OUTGOING_WEBHOOK_URL_FILE", {"escalation"}),
    "outgoing-webhook-secret": ("secret", "OUTGOING_WEBHOOK_SECRET_FILE", {"escalation"}),
    "remediation-db": ("dsn", "REMEDIATION_DB_DSN_FILE", {"remediation"}),
}
OPTIONAL_SECRETS = ("pagerduty-key", "slack-webhook", "teams-webhook", "outgoing-webhook", "outgoing-webhook-secret",
                    "remediation-db")
CONFIG_FILES = {
    "remediation": ("incident-playbooks", "playbooks.yaml", "PLAYBOOKS_FILE", "/etc/incident-response/playbooks"),
    "diagnostics": ("incident-probes", "probes.yaml", "DIAGNOSTICS_FILE", "/etc/incident-response/probes"),
    "intake": ("incident-correlation", "correlation.yaml", "CORRELATION_FILE", "/etc/incident-response/correlation"),
    "intake-events": ("incident-correlation", "correlation.yaml", "CORRELATION_FILE", "/etc/incident-response/correlation"),
}


PROCESS_MODEL = "incident-response/process-model"


def process_model(concurrency: int) -> str:
    """Why each instance runs one process: said in the manifest itself."""
    return (f"One process (shared/serve.py: functions-framework's app in waitress) with {concurrency} threads (THREADS = "
            "containerConcurrency): Knative sends an instance at most containerConcurrency requests and scales out by adding "
            "pods, and Kubernetes restarts a container whose process dies, so neither a second worker nor gunicorn's master "
            "(a second copy of Flask and main.py, and a fork at every start) would add anything but memory and start time; "
            "a second worker would also double the database pool of every pod and split the intake's group commit in two. "
            "The work is I/O-bound (PostgreSQL, the Broker, the Kubernetes API), so threads overlap it under one GIL. "
            "/health is answered with the database alone; the handlers are imported by the first other request "
            "(shared/http.py built_on_first_request). "
            "DB_POOL_SIZE + DB_MAX_OVERFLOW cover the threads; docs/deploy.md sizes pools, PgBouncer and max-scale together.")


def service(name: str) -> dict:
    row = SERVICES[name]
    function, account, public, publishes = row.function, row.account, row.public, row.publishes
    concurrency, timeout, memory = row.concurrency, row.timeout, row.memory
    env = [
        {"name": "FUNCTION_SOURCE", "value": f"functions/{function}/main.py"},
        {"name": "FUNCTION_TARGET", "value": function},
        # One thread per request Knative may send.
        {"name": "THREADS", "value": str(concurrency)},
    ]
    # waitress spools an answer over 1 MB to a temporary file; the root is read-only.
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
    for secret, (key, variable, users) in SECRET_MOUNTS.items():
        if name not in users:
            continue
        env.append({"name": variable, "value": f"{SECRETS}/{secret}/{key}"})
        mounts.append({"name": secret, "mountPath": f"{SECRETS}/{secret}", "readOnly": True})
        # Optional integrations may be absent: the function then says it is off.
        optional = secret in OPTIONAL_SECRETS
        volumes.append({"name": secret, "secret": {"secretName": secret, "optional": optional}})
    if name in CONFIG_FILES:
        configmap, filename, variable, path = CONFIG_FILES[name]
        env.append({"name": variable, "value": f"{path}/{filename}"})
        mounts.append({"name": configmap, "mountPath": path, "readOnly": True})
        volumes.append({"name": configmap, "configMap": {"name": configmap}})
    env.extend({"name": variable, "value": value} for variable, value in row.env.items())
    if name in PROXY_HOPS:
        env.append({"name": "TRUSTED_PROXY_HOPS", "value": PROXY_HOPS[name]})
    labels = {"app.kubernetes.io/part-of": "incident-response", "app.kubernetes.io/component": name}
    if publishes:
        labels["incident-response/publishes-events"] = "true"
    if not public:
        labels["networking.knative.dev/visibility"] = "cluster-local"
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels, "annotations": {PROCESS_MODEL: process_model(concurrency)}},
        "spec": {
            "template": {
                "metadata": {
                    "labels": {"app.kubernetes.io/part-of": "incident-response", "app.kubernetes.io/component": name},
                    "annotations": {
                        "autoscaling.knative.dev/min-scale": "0",
                        "autoscaling.knative.dev/max-scale": str(MAX_SCALE),
                        "autoscaling.knative.dev/target": str(concurrency),
                        # Keep the activator in every request's path, so the
                        # NetworkPolicy need not admit the shared ingress gateway.
                        **({} if public else {"autoscaling.knative.dev/target-burst-capacity": "-1"}),
                        **({"autoscaling.knative.dev/target-burst-capacity": "0"} if name in STABLE_HOPS else {}),
                    },
                },
                "spec": {
                    "serviceAccountName": account,
                    "containerConcurrency": concurrency,
                    "timeoutSeconds": timeout,
                    "containers": [{
                        "name": "function",
                        "image": "incident-response",
                        "ports": [{"containerPort": 8080}],
                        "env": env,
                        "envFrom": [{"configMapRef": {"name": "incident-response-config"}}],
                        **PROBES,
                        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "1", "memory": memory}},
                        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
            # Explicit, so that `kubectl apply` (make deploy) undoes a
            # rollback's `kn service update --traffic <revision>=100`: a
            # field the manifest never set would be left as kn pinned it.
            "traffic": [{"latestRevision": True, "percent": 100}],
        },
    }


# Both probes ask /health, which also checks the database. Readiness: a
# replica that cannot reach PostgreSQL takes no requests (the activator
# holds them, AlertManager and the Broker retry) instead of answering 503s.
# Liveness restarts only a process that stays unhealthy for five minutes
# (a wedged worker), so a database outage does not put every pod into
# restart back-off just when the database returns. No port: Knative probes
# the container port itself.
HEALTH_PATH = "/health"
PROBES = {
    "readinessProbe": {"httpGet": {"path": HEALTH_PATH}, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
    "livenessProbe": {"httpGet": {"path": HEALTH_PATH}, "periodSeconds": 30, "timeoutSeconds": 5, "failureThreshold": 10},
}


# The pods that may call a cluster-local function, as the upstream
# manifests label them (knative/eventing config/brokers/mt-channel-broker,
# config/core/deployments/pingsource-mt-adapter.yaml; knative/serving
# config/core/deployments/activator.yaml, autoscaler.yaml). A request that
# goes through Knative Serving reaches the pod from the activator; the
# Broker and the PingSource reach it themselves when a mesh routes pod to pod.
KNATIVE_PEERS = [
    ("knative-eventing", {"matchExpressions": [{"key": "eventing.knative.dev/brokerRole", "operator": "In", "values": ["ingress", "filter"]}]}, "the Broker's ingress and filter"),
    ("knative-eventing", {"matchLabels": {"eventing.knative.dev/source": "ping-source-controller", "sources.knative.dev/role": "adapter"}}, "the PingSource adapter"),
    ("knative-serving", {"matchLabels": {"app": "activator"}}, "the activator (scale from zero)"),
]
# queue-proxy, in front of every function container: requests on 8012 (8112
# with TLS), autoscaling metrics on 9090 (scraped by the autoscaler).
QUEUE_PROXY_PORTS = (8012, 8112)
AUTOSCALER_METRICS_PORT = 9090


def network_policy() -> dict:
    """Only Knative's data plane may call the functions nobody outside should
    reach: the Broker, the PingSource and Knative Serving's activator."""
    local = sorted(name for name, row in SERVICES.items() if not row.public)
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}, "podSelector": pods}
             for ns, pods, _ in KNATIVE_PEERS]
    autoscaler = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}},
                  "podSelector": {"matchLabels": {"app": "autoscaler"}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "incident-response-cluster-local",
                     "labels": {"app.kubernetes.io/part-of": "incident-response"}},
        "spec": {
            "podSelector": {"matchExpressions": [
                {"key": "app.kubernetes.io/part-of", "operator": "In", "values": ["incident-response"]},
                {"key": "app.kubernetes.io/component", "operator": "In", "values": local},
            ]},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": peers, "ports": [{"protocol": "TCP", "port": p} for p in QUEUE_PROXY_PORTS]},
                {"from": [autoscaler], "ports": [{"protocol": "TCP", "port": AUTOSCALER_METRICS_PORT}]},
            ],
        },
    }


HEADER = "# Generated by `make manifests` from deploy/manifests.py; edit the table there.\n"

# Knative's queue-proxy, in front of every function container, serves HTTP
# on 8012: a Service that selects the pods must go through it, so the
# concurrency limit and the request timeout still hold.
QUEUE_PROXY_HTTP_PORT = 8012


def seed_api_service() -> dict:
    """The seed's ``incident-api`` (ClusterIP, port 8080) in front of the
    query function's pods, which the production overlay keeps warm."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SEED_API_SERVICE,
                     "labels": {"app.kubernetes.io/part-of": "incident-response", "app.kubernetes.io/component": SEED_API_SERVICE}},
        "spec": {
            "type": "ClusterIP",
            # Knative labels every pod of a Service's revisions with it.
            "selector": {"serving.knative.dev/service": SEED_API_FUNCTION},
            "ports": [{"name": "http", "protocol": "TCP", "port": SEED_API_PORT, "targetPort": QUEUE_PROXY_HTTP_PORT}],
        },
    }


def production_kustomization() -> str:
    warm = sorted(name for name, row in SERVICES.items() if row.warm)
    counts = {SERVICES[name].warm for name in warm}
    assert len(counts) == 1, "one min-scale patch per replica count: extend production_kustomization"
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "production",
        "resources": ["../../base", "incident-api.yaml"],
        "patches": [{
            "target": {"group": "serving.knative.dev", "version": "v1", "kind": "Service", "name": "|".join(warm)},
            "patch": yaml.safe_dump([{"op": "replace",
                                      "path": "/spec/template/metadata/annotations/autoscaling.knative.dev~1min-scale",
                                      "value": str(counts.pop())}], sort_keys=False),
        }],
    }
    return (HEADER + "# Production: namespace `production`; the Services alerts and engineers hit keep\n"
            "# warm replicas (no cold start between an alert and its incident; the seed's AC4\n"
            "# asks for two running replicas), and the seed's `incident-api` Service.\n"
            + yaml.safe_dump(doc, sort_keys=False))


# kustomize may not read files outside its folder, so the shipped playbooks
# and probes are copied next to the kustomization.
COPIES = {
    "playbooks.yaml": "functions/remediation/playbooks.yaml",
    "probes.yaml": "functions/diagnostics/probes.yaml",
    "correlation.yaml": "functions/intake/correlation.yaml",
}


def copy_header(source: str) -> str:
    return (f"# Generated copy of {source} by `make manifests` (deploy/manifests.py).\n"
            f"# Do not edit: edit {source} and run `make manifests`.\n")


def rendered() -> dict[Path, str]:
    docs = [service(name) for name in SERVICES]
    files = {BASE / "services.yaml": HEADER + yaml.safe_dump_all(docs, sort_keys=False)}
    files[BASE / "networkpolicy.yaml"] = HEADER + yaml.safe_dump(network_policy(), sort_keys=False)
    for name, source in COPIES.items():
        files[BASE / "config" / name] = copy_header(source) + (ROOT / source).read_text()
    files[PRODUCTION / "kustomization.yaml"] = production_kustomization()
    files[PRODUCTION / "incident-api.yaml"] = HEADER + yaml.safe_dump(seed_api_service(), sort_keys=False)
    files.update(monitoring.rendered())
    return files


def main(argv: list[str]) -> int:
    stale = [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run make manifests)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(rendered())} files under knative/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
