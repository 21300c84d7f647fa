"""The Knative deployment, checked without a cluster: it builds, every object
validates the way an API server with strict field validation would, the
wiring names things that exist, the environment is what the code reads, and
RBAC covers exactly the calls the code makes."""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from functions.diagnostics.facts import CLUSTER_PERMISSIONS, NAMESPACED_PERMISSIONS
from functions.remediation.actions import KUBERNETES_PERMISSIONS
from deploy import manifests

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "fixtures" / "knative-schemas"
KUBECTL = Path(sys.executable).parent / "kubectl"
CRD_FILES = {
    ("serving.knative.dev/v1", "Service"): "serving-service.crd.yaml",
    ("eventing.knative.dev/v1", "Broker"): "eventing-broker.crd.yaml",
    ("eventing.knative.dev/v1", "Trigger"): "eventing-trigger.crd.yaml",
    ("sources.knative.dev/v1", "SinkBinding"): "eventing-sinkbindings.crd.yaml",
    ("sources.knative.dev/v1", "PingSource"): "eventing-pingsource.crd.yaml",
}
KNOWN_ANNOTATIONS = {
    "autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/max-scale", "autoscaling.knative.dev/target",
    "autoscaling.knative.dev/initial-scale", "autoscaling.knative.dev/metric", "autoscaling.knative.dev/class",
    "autoscaling.knative.dev/scale-down-delay", "autoscaling.knative.dev/window", "autoscaling.knative.dev/target-utilization-percentage",
    "autoscaling.knative.dev/target-burst-capacity",
}


def ksvc(doc: dict) -> bool:
    return doc["kind"] == "Service" and doc["apiVersion"] == "serving.knative.dev/v1"


def build(path: str) -> list[dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(ROOT / path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def production():
    return build("knative/overlays/production")


@pytest.fixture(scope="module")
def base():
    return build("knative/base")


def strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as jsonschema, unknown fields refused
    unless the CRD preserves them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
        for key in list(node):
            if key.startswith("x-kubernetes-"):
                node.pop(key)
        if node.get("type") == "object" and "properties" in node and not preserve and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.get("properties", {}).values():
            walk(value)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub)

    walk(schema)
    schema.get("properties", {}).pop("metadata", None)
    schema.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"}})
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    doc = next(d for d in yaml.safe_load_all((SCHEMAS / CRD_FILES[(api_version, kind)]).read_text()) if d)
    version = api_version.split("/")[1]
    (entry,) = [v for v in doc["spec"]["versions"] if v["name"] == version]
    return strict(entry["schema"]["openAPIV3Schema"])


def test_generated_manifests_are_current():
    assert manifests.main(["--check"]) == 0, "run make manifests"


def test_every_yaml_file_parses():
    for path in list((ROOT / "knative").rglob("*.yaml")) + [ROOT / "prometheus" / "alertmanager.yml"]:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_both_kustomizations_build(base, production):
    assert {d["kind"] for d in production} >= {"Service", "Broker", "Trigger", "SinkBinding", "PingSource", "Job",
                                               "ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
    assert all(d["metadata"].get("namespace") == "production" for d in production if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"))


def test_knative_objects_validate_against_the_upstream_crds(production):
    checked = 0
    for doc in production:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            jsonschema.validate({k: v for k, v in doc.items() if k != "metadata"}, crd_schema(*key))
            checked += 1
    assert checked >= 17


def test_unknown_fields_are_caught_by_the_crd_check():
    service = yaml.safe_load(manifests.rendered()[manifests.BASE / "services.yaml"].split("---")[0].split("\n", 1)[1])
    service["spec"]["template"]["spec"]["containerConcurency"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in service.items() if k != "metadata"}, crd_schema("serving.knative.dev/v1", "Service"))


def test_core_objects_validate_against_the_kubernetes_schemas(production):
    for doc in production:
        if doc["apiVersion"].endswith("knative.dev/v1"):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_knative_services_scale_to_zero_with_known_annotations(base, production):
    for doc in base:
        if not ksvc(doc):
            continue
        template = doc["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert set(annotations) <= KNOWN_ANNOTATIONS
        assert annotations["autoscaling.knative.dev/min-scale"] == "0"
        spec = template["spec"]
        container = spec["containers"][0]
        assert spec["containerConcurrency"] == int(next(e["value"] for e in container["env"] if e["name"] == "THREADS"))
        # One process per instance (no WORKERS to raise), and the manifest says why.
        assert "WORKERS" not in {e["name"] for e in container["env"]}
        assert "One process" in doc["metadata"]["annotations"]["incident-response/process-model"]
        assert container["resources"]["limits"] and container["securityContext"]["runAsNonRoot"]
    warm = {d["metadata"]["name"] for d in production if ksvc(d)
            and d["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "2"}
    assert warm == {"intake", "query"}


def test_the_query_keeps_the_activator_out_of_the_path_so_its_proxy_hops_stay_the_same(base):
    """TRUSTED_PROXY_HOPS counts X-Forwarded-For entries; the activator adds one when in the path."""
    burst = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"].get("autoscaling.knative.dev/target-burst-capacity")
             for d in base if ksvc(d)}
    assert burst["query"] == "0" and burst["intake"] is None
    # On that path, the ingress gateway's entry and the queue-proxy's: the
    # default 0 would make every client the queue-proxy's loopback address.
    hops = {d["metadata"]["name"]: {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            .get("TRUSTED_PROXY_HOPS") for d in base if ksvc(d)}
    assert hops == {name: ("2" if name == "query" else None) for name in hops}


def test_only_intake_and_query_are_reachable_from_outside_the_cluster(base):
    public = {d["metadata"]["name"] for d in base if ksvc(d)
              and d["metadata"]["labels"].get("networking.knative.dev/visibility") != "cluster-local"}
    assert public == {"intake", "query"}


def test_wiring_names_services_that_exist(base):
    services = {d["metadata"]["name"]: d for d in base if ksvc(d)}
    for doc in base:
        if doc["kind"] == "Trigger":
            assert doc["spec"]["subscriber"]["ref"]["name"] in services, doc["metadata"]["name"]
            assert doc["spec"]["broker"] == "incidents"
        if doc["kind"] == "PingSource":
            assert doc["spec"]["sink"]["ref"]["name"] in services
        if doc["kind"] == "Broker":
            assert doc["spec"]["delivery"]["deadLetterSink"]["ref"]["name"] == "deadletter"
    (binding,) = [d for d in base if d["kind"] == "SinkBinding"]
    selector = binding["spec"]["subject"]["selector"]["matchLabels"]
    bound = {n for n, s in services.items() if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())}
    assert bound == {"intake", "intake-events", "query", "remediation"}
    # Escalation gets every transition of every priority: the settings decide, not a filter.
    to_escalation = [d["spec"]["filter"]["attributes"] for d in base
                     if d["kind"] == "Trigger" and d["spec"]["subscriber"]["ref"]["name"] == "escalation"]
    assert sorted(a["type"].rsplit(".", 1)[1] for a in to_escalation) == sorted(
        ["opened", "acknowledged", "remediated", "remediation_failed", "resolved"])
    assert all(set(a) == {"type"} for a in to_escalation)


def settings_read_by_code() -> set[str]:
    source = (ROOT / "shared" / "config.py").read_text()
    names = set(re.findall(r'\(env, "([A-Z0-9_]+)"', source))
    secrets = re.findall(r'read_secret\(env, "([A-Z0-9_]+)"\)', source) + re.findall(r'secret\("([A-Z0-9_]+)"', source)
    names |= set(secrets) | {f"{n}_FILE" for n in secrets}
    return names | {"FUNCTION_SOURCE", "FUNCTION_TARGET", "THREADS"}  # read by the image's command (shared/serve.py)


def test_every_env_var_a_manifest_sets_is_read_by_the_code(production):
    known = settings_read_by_code()
    for doc in production:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("incident-response-config"):
            assert set(doc["data"]) <= known, set(doc["data"]) - known
        if ksvc(doc) or doc["kind"] == "Job":
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert names <= known, (doc["metadata"]["name"], names - known)
                assert "DATABASE_URL_FILE" in names
                if doc["metadata"]["name"] in ("intake", "query", "intake-events"):
                    assert "INCIDENT_API_TOKEN_FILE" in names


def _rules(docs, role):
    (doc,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == role]
    return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_covers_exactly_the_calls_the_code_makes(base):
    namespaced = {p for p in KUBERNETES_PERMISSIONS if p[1] != "nodes"}
    assert _rules(base, "incident-remediation") == namespaced
    assert _rules(base, "incident-diagnostics") == NAMESPACED_PERMISSIONS
    (diagnostics_nodes,) = [d for d in base if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "incident-diagnostics-nodes"]
    assert {(g, r, v) for rule in diagnostics_nodes["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} == CLUSTER_PERMISSIONS
    # Diagnostics only reads, and never Secrets.
    assert {v for _, _, v in NAMESPACED_PERMISSIONS | CLUSTER_PERMISSIONS} <= {"get", "list", "watch"}
    assert not [p for p in NAMESPACED_PERMISSIONS | CLUSTER_PERMISSIONS if p[1] == "secrets"]
    nodes = yaml.safe_load_all((ROOT / "knative" / "components" / "node-actions" / "node-rbac.yaml").read_text())
    (cluster_role,) = [d for d in nodes if d["kind"] == "ClusterRole"]
    assert {(g, r, v) for rule in cluster_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} == {p for p in KUBERNETES_PERMISSIONS if p[1] == "nodes"}


def test_secret_templates_are_placeholders_and_never_applied(base):
    assert not [d for d in base if d["kind"] == "Secret"]
    templates = list(yaml.safe_load_all((ROOT / "knative" / "base" / "secrets.yaml").read_text()))
    assert {d["metadata"]["name"] for d in templates} == set(manifests.SECRET_MOUNTS)
    for doc in templates:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        assert all("REPLACE" in value for value in doc["stringData"].values()), doc["metadata"]["name"]


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool comes with prometheus-alertmanager (make test installs it)")
def test_amtool_accepts_the_alertmanager_config():
    result = subprocess.run(["amtool", "check-config", str(ROOT / "prometheus" / "alertmanager.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "prometheus" / "alertmanager.yml").read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "incident-webhook"]
    hook = receiver["webhook_configs"][0]
    assert hook["send_resolved"] is True and hook["url"].endswith("/webhook/alert")
    assert hook["http_config"]["authorization"]["credentials_file"].endswith("incident-api-token/token")


# Pod labels and namespaces as the upstream Knative manifests set them
# (knative/eventing config/brokers/mt-channel-broker/deployments/*.yaml,
# config/core/deployments/pingsource-mt-adapter.yaml; knative/serving
# config/core/deployments/activator.yaml, autoscaler.yaml).
BROKER_FILTER = ("knative-eventing", {"eventing.knative.dev/brokerRole": "filter", "eventing.knative.dev/release": "v1.22.0"})
BROKER_INGRESS = ("knative-eventing", {"eventing.knative.dev/brokerRole": "ingress", "eventing.knative.dev/release": "v1.22.0"})
PING_ADAPTER = ("knative-eventing", {"eventing.knative.dev/source": "ping-source-controller", "sources.knative.dev/role": "adapter"})
ACTIVATOR = ("knative-serving", {"app": "activator", "role": "activator", "app.kubernetes.io/name": "activator"})
AUTOSCALER = ("knative-serving", {"app": "autoscaler", "app.kubernetes.io/name": "autoscaler"})


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def admitted(policy: dict, namespace: str, labels: dict, port: int) -> bool:
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule.get("ports", [])]:
            continue
        for peer in rule["from"]:
            ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
            if ns_ok and selects(peer.get("podSelector", {}), labels):
                return True
    return False


def test_network_policy_admits_only_knative_to_the_cluster_local_functions(production):
    (policy,) = [d for d in production if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "production" and policy["spec"]["policyTypes"] == ["Ingress"]
    services = {d["metadata"]["name"]: d for d in production if ksvc(d)}
    guarded = {name for name, d in services.items() if selects(policy["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert guarded == {"diagnostics", "remediation", "escalation", "deadletter", "intake-events"}
    for peer in (BROKER_FILTER, BROKER_INGRESS, PING_ADAPTER, ACTIVATOR):
        assert admitted(policy, *peer, 8012), peer
    assert admitted(policy, *AUTOSCALER, 9090) and not admitted(policy, *AUTOSCALER, 8012)
    # Anything else in the cluster: the other functions, a pod with the
    # Broker's labels outside knative-eventing, the shared ingress gateway.
    for namespace, labels in [("production", services["query"]["spec"]["template"]["metadata"]["labels"]),
                              ("production", BROKER_FILTER[1]), ("default", {"app": "curl"}),
                              ("kourier-system", {"app": "3scale-kourier-gateway"}), ("knative-serving", {"app": "controller"})]:
        assert not admitted(policy, namespace, labels, 8012), (namespace, labels)
    # Without the gateway admitted, requests must always pass the activator.
    for name in guarded:
        annotations = services[name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/target-burst-capacity"] == "-1", name


def test_generated_config_copies_say_where_they_come_from():
    for name, source in manifests.COPIES.items():
        text = (manifests.BASE / "config" / name).read_text()
        assert text.startswith(manifests.copy_header(source)), name
        assert source in text.splitlines()[0] and "make manifests" in text
        assert yaml.safe_load(text) == yaml.safe_load((ROOT / source).read_text())


def test_the_local_stack_and_the_manifests_read_one_service_table(base):
    from deploy.services import SERVICES
    from local.run import FUNCTIONS, Stack

    assert set(FUNCTIONS) == set(SERVICES) == {d["metadata"]["name"] for d in base if ksvc(d)}
    stack = Stack("postgresql://unused", "t", {name: 1 for name in SERVICES}, 2)
    for doc in (d for d in base if ksvc(d)):
        name = doc["metadata"]["name"]
        env = {e["name"]: e.get("value") for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
        local = stack.function_env(name)
        for variable, value in SERVICES[name].env.items():
            assert env[variable] == local[variable] == value, (name, variable)
        assert ("K_SINK" in local) == SERVICES[name].publishes, name
    assert SERVICES["intake-events"].env == {"EVENTS_REQUIRE_TOKEN": "false", "DB_BOUNDS_ROLE": "broker-called"}


def iso_seconds(duration: str) -> float:
    """An ISO 8601 duration as Knative's delivery fields take it (PT…H…M…S)."""
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", duration)
    assert match and any(match.groups()), duration
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def delivery_of(trigger: dict, broker: dict) -> dict:
    # A Trigger's own delivery replaces the Broker's as a whole.
    return trigger["spec"].get("delivery") or broker["spec"]["delivery"]


def test_probes_ask_health_over_http(production):
    for doc in production:
        if not ksvc(doc):
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health"}, (doc["metadata"]["name"], probe)
            assert "tcpSocket" not in container[probe]
        # A database outage must not restart every pod within a minute.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300


def test_no_delivery_gives_up_while_its_subscriber_may_still_be_working(production):
    (broker,) = [d for d in production if d["kind"] == "Broker"]
    services = {d["metadata"]["name"]: d for d in production if ksvc(d)}
    triggers = [d for d in production if d["kind"] == "Trigger"]
    for trigger in triggers:
        delivery = delivery_of(trigger, broker)
        subscriber = services[trigger["spec"]["subscriber"]["ref"]["name"]]
        limit = subscriber["spec"]["template"]["spec"]["timeoutSeconds"]
        assert iso_seconds(delivery["timeout"]) >= limit, (trigger["metadata"]["name"], delivery["timeout"], limit)
        assert delivery["deadLetterSink"]["ref"] == {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "deadletter"}
    remediation = services["remediation"]["spec"]["template"]["spec"]["timeoutSeconds"]
    assert remediation == 300 and iso_seconds(broker["spec"]["delivery"]["timeout"]) < remediation  # the case that needed a Trigger policy


def retry_span_seconds(delivery: dict) -> tuple[float, float]:
    """The least time Knative spends retrying before the dead-letter sink,
    and the longest single back-off. Knative waits backoffDelay × 2^n before
    retry n (exponential) or backoffDelay × n (linear); taking n from 0 is
    the shorter reading of the two the versions have used."""
    delay = iso_seconds(delivery["backoffDelay"])
    retries = delivery["retry"]
    if delivery.get("backoffPolicy", "exponential") == "exponential":
        waits = [delay * 2 ** n for n in range(retries)]
    else:
        waits = [delay * (n + 1) for n in range(retries)]
    return sum(waits), max(waits)


def test_pages_outlive_a_ten_minute_outage_of_the_paging_providers(production):
    (broker,) = [d for d in production if d["kind"] == "Broker"]
    to_escalation = [d for d in production if d["kind"] == "Trigger" and d["spec"]["subscriber"]["ref"]["name"] == "escalation"]
    assert len(to_escalation) == 5
    for trigger in to_escalation:
        assert "delivery" in trigger["spec"], trigger["metadata"]["name"]
        span, longest = retry_span_seconds(trigger["spec"]["delivery"])
        assert span >= 600, (trigger["metadata"]["name"], span)
        assert longest >= 120, "minutes of back-off, as PagerDuty asks on 429"
    # The Broker's own policy would not have: that is why escalation has its own.
    assert retry_span_seconds(broker["spec"]["delivery"])[0] < 600


def test_the_seeds_incident_api_reaches_the_warm_query_pods_on_8080(base, production):
    assert not [d for d in base if d["metadata"]["name"] == "incident-api"]
    (api,) = [d for d in production if d["kind"] == "Service" and d["apiVersion"] == "v1"]
    assert api["metadata"] == {**api["metadata"], "name": "incident-api", "namespace": "production"}
    assert api["spec"]["type"] == "ClusterIP"
    (port,) = api["spec"]["ports"]
    assert port["port"] == 8080 and port["protocol"] == "TCP"
    (query,) = [d for d in production if ksvc(d) and d["metadata"]["name"] == "query" and "template" in d["spec"]]
    # The labels Knative gives the pods of a Service's revisions: the
    # template's, plus serving.knative.dev/{service,configuration,revision}.
    pod_labels = {**query["spec"]["template"]["metadata"]["labels"], "serving.knative.dev/service": "query",
                  "serving.knative.dev/configuration": "query", "serving.knative.dev/revision": "query-00001"}
    assert selects({"matchLabels": api["spec"]["selector"]}, pod_labels)
    for other in ("intake", "intake-events", "diagnostics"):
        assert not selects({"matchLabels": api["spec"]["selector"]}, {**pod_labels, "serving.knative.dev/service": other})
    # Through queue-proxy (its HTTP port), never straight to the function.
    assert port["targetPort"] == manifests.QUEUE_PROXY_HTTP_PORT == 8012
    assert query["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "2"
    # The shipped AlertManager receiver keeps pointing at the intake.
    config = yaml.safe_load((ROOT / "prometheus" / "alertmanager.yml").read_text())
    urls = [h["url"] for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert urls == ["http://intake.production.svc.cluster.local/webhook/alert"]


def test_make_deploy_returns_traffic_to_the_latest_revision(production):
    """A rollback pins traffic with kn; `kubectl apply` of a manifest that
    never named `traffic` would leave the pin (a three-way merge keeps
    fields the last applied configuration did not have)."""
    for doc in production:
        if ksvc(doc):
            assert doc["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}], doc["metadata"]["name"]
    makefile = (ROOT / "Makefile").read_text()
    deploy = makefile[makefile.index("\ndeploy:"):]
    assert "kubectl apply -f .run/production.yaml\n" in deploy
