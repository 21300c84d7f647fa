"""The ``kn`` commands (deploy/kn.py) configure what the manifests configure.

No cluster here, so the commands are read back the way kn applies them
(knative/client pkg/commands/flags/podspec.go and the kn_* command docs:
``--volume NAME=secret:S`` makes a volume NAME, ``--mount PATH=NAME`` mounts
it read-only unless it is an emptyDir, ``--security-context strict`` drops
all capabilities and so on), then kubectl's patches are applied, and the
resulting objects are compared with `kubectl kustomize` of the production
overlay, setting by setting.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess

import pytest

from deploy import kn, manifests
from deploy.services import SERVICES
from tests.test_manifests import build, ksvc

IMAGE = "ghcr.io/example/incident-response:latest"  # what the kustomization's images: entry makes of it
KSVC_API = "serving.knative.dev/v1"
# What `kn service create --security-context strict` sets (kn's DefaultStrictSecCon).
STRICT = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
          "seccompProfile": {"type": "RuntimeDefault"}}
BOOLEAN_FLAGS = {"--cluster-local", "--no-cluster-local"}


@pytest.fixture(scope="module")
def production():
    return build("knative/overlays/production")


def flags(argv) -> list[tuple[str, str | None]]:
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), argv[i:]
        if flag in BOOLEAN_FLAGS:
            out.append((flag, None))
            i += 1
        else:
            out.append((flag, argv[i + 1]))
            i += 2
    return out


def new_ksvc(name: str) -> dict:
    return {"apiVersion": KSVC_API, "kind": "Service", "metadata": {"name": name, "labels": {}},
            "spec": {"template": {"metadata": {"labels": {}, "annotations": {}},
                                  "spec": {"containers": [{"env": [], "volumeMounts": []}], "volumes": []}}}}


def kn_service(argv, existing: dict | None = None) -> dict:
    assert argv[:2] == ("kn", "service") and argv[2] in ("create", "update")
    name = argv[3]
    svc = copy.deepcopy(existing) if existing else new_ksvc(name)
    template = svc["spec"]["template"]
    spec = template["spec"]
    container = spec["containers"][0]
    annotations = template["metadata"]["annotations"]
    for flag, value in flags(argv[4:]):
        if flag == "--namespace":
            svc["metadata"]["namespace"] = value
        elif flag == "--image":
            container["image"] = value
        elif flag == "--port":
            container["ports"] = [{"containerPort": int(value)}]
        elif flag == "--service-account":
            spec["serviceAccountName"] = value
        elif flag == "--env":
            key, _, val = value.partition("=")
            container["env"] = [e for e in container["env"] if e["name"] != key] + [{"name": key, "value": val}]
        elif flag == "--env-from":
            kind, _, ref = value.partition(":")
            assert kind in ("cm", "config-map")
            container.setdefault("envFrom", []).append({"configMapRef": {"name": ref}})
        elif flag == "--volume":
            volume, _, source = value.partition("=")
            kind, _, rest = source.partition(":")
            if kind in ("secret", "sc"):
                entry = {"secret": {"secretName": rest}}
            elif kind in ("cm", "config-map"):
                entry = {"configMap": {"name": rest}}
            else:
                assert kind in ("emptyDir", "ed")
                _, _, options = rest.partition(":")
                opts = dict(o.split("=", 1) for o in options.split(",") if o)
                entry = {"emptyDir": {"medium": opts.get("type", ""), "sizeLimit": opts.get("size")}}
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] != volume] + [{"name": volume, **entry}]
        elif flag == "--mount":
            path, _, volume = value.partition("=")
            (source,) = [v for v in spec["volumes"] if v["name"] == volume]
            mount = {"name": volume, "mountPath": path, "readOnly": "emptyDir" not in source}
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != path] + [mount]
        elif flag in ("--scale-min", "--scale-max", "--scale-target"):
            key = {"--scale-min": "min-scale", "--scale-max": "max-scale", "--scale-target": "target"}[flag]
            annotations[f"autoscaling.knative.dev/{key}"] = value
        elif flag == "--concurrency-limit":
            spec["containerConcurrency"] = int(value)
        elif flag == "--timeout":
            spec["timeoutSeconds"] = int(value)
        elif flag == "--cluster-local":
            svc["metadata"]["labels"]["networking.knative.dev/visibility"] = "cluster-local"
        elif flag == "--no-cluster-local":
            svc["metadata"]["labels"].pop("networking.knative.dev/visibility", None)
        elif flag == "--annotation-revision":
            key, _, val = value.partition("=")
            annotations[key] = val
        elif flag == "--annotation-service":
            key, _, val = value.partition("=")
            svc["metadata"].setdefault("annotations", {})[key] = val
        elif flag in ("--label-revision", "--label-service"):
            key, _, val = value.partition("=")
            (template["metadata"] if flag == "--label-revision" else svc["metadata"])["labels"][key] = val
        elif flag in ("--request", "--limit"):
            section = "requests" if flag == "--request" else "limits"
            container.setdefault("resources", {}).setdefault(section, {}).update(
                dict(item.split("=", 1) for item in value.split(",")))
        elif flag in ("--probe-readiness", "--probe-liveness"):
            scheme, host, port, path = value.split(":")
            assert scheme == "http"
            action = {"path": path, **({"host": host} if host else {}), **({"port": int(port)} if port else {})}
            container[flag[8:] + "Probe"] = {**container.get(flag[8:] + "Probe", {}), "httpGet": action}
        elif flag in ("--probe-readiness-opts", "--probe-liveness-opts"):
            probe = container.setdefault(flag[8:-5] + "Probe", {})
            for option in value.split(","):
                key, _, number = option.partition("=")
                probe[key[0].lower() + key[1:]] = int(number)
        elif flag == "--security-context":
            assert value == "strict"
            container["securityContext"] = copy.deepcopy(STRICT)
        elif flag == "--traffic":
            target, _, percent = value.partition("=")
            entry = {"latestRevision": True} if target == "@latest" else {"revisionName": target, "latestRevision": False}
            svc["spec"]["traffic"] = [{**entry, "percent": int(percent)}]
        else:
            raise AssertionError(f"flag the test does not model: {flag}")
    # Knative's defaulting webhook: no traffic block means all to the latest.
    svc["spec"].setdefault("traffic", [{"latestRevision": True, "percent": 100}])
    return svc


def json_patch(doc: dict, operations: list[dict]) -> None:
    for op in operations:
        assert op["op"] == "add"
        *parents, last = op["path"].lstrip("/").split("/")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = op["value"]


def merge_patch(doc: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            merge_patch(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def kubectl_patch(objects: dict, argv) -> None:
    assert argv[0] == "kubectl" and argv[3] == "patch"
    kind, name, kind_of_patch, body = argv[4], argv[5], argv[7], json.loads(argv[9])
    target = objects[(kind, name)]
    (json_patch if kind_of_patch == "json" else merge_patch)(target, body)


def sink(value: str) -> dict:
    if value.startswith("http://"):
        return {"uri": value}
    kind, _, name = value.partition(":")
    api, kind = {"ksvc": (KSVC_API, "Service"), "broker": ("eventing.knative.dev/v1", "Broker")}[kind]
    return {"ref": {"apiVersion": api, "kind": kind, "name": name}}


def kn_eventing(argv) -> tuple[tuple[str, str], dict]:
    """kn broker/trigger/source create, as the object it creates."""
    if argv[1] == "source":
        kind, name, rest = argv[2], argv[4], argv[5:]
    else:
        kind, name, rest = argv[1], argv[3], argv[4:]
    opts: dict[str, list[str]] = {}
    for flag, value in flags(rest):
        opts.setdefault(flag, []).append(value)
    if kind == "broker":
        delivery = {"retry": int(opts["--retry"][0]), "backoffPolicy": opts["--backoff-policy"][0],
                    "backoffDelay": opts["--backoff-delay"][0], "timeout": opts["--timeout"][0],
                    "deadLetterSink": sink(opts["--dl-sink"][0])}
        return ("broker", name), {"spec": {"delivery": delivery}}
    if kind == "trigger":
        attributes = dict(f.split("=", 1) for f in opts.get("--filter", []))
        return ("trigger", name), {"spec": {"broker": opts["--broker"][0], "filter": {"attributes": attributes},
                                            "subscriber": sink(opts["--sink"][0])}}
    if kind == "ping":
        return ("pingsource", name), {"spec": {"schedule": opts["--schedule"][0], "data": opts["--data"][0],
                                               "sink": sink(opts["--sink"][0])}}
    assert kind == "binding"
    subject_kind, api, selector = opts["--subject"][0].split(":", 2)
    labels = dict(pair.split("=", 1) for pair in selector.split(","))
    return ("sinkbinding", name), {"spec": {"subject": {"apiVersion": api, "kind": subject_kind,
                                                        "selector": {"matchLabels": labels}},
                                            "sink": sink(opts["--sink"][0])}}


def applied(steps) -> dict:
    objects: dict = {}
    for step in steps:
        argv = step.argv
        if argv[:2] == ("kn", "service"):
            objects[("ksvc", argv[3])] = kn_service(argv)
        elif argv[0] == "kn":
            key, obj = kn_eventing(argv)
            objects[key] = obj
        elif argv[3] == "patch":
            kubectl_patch(objects, argv)
        else:
            assert argv[3:5] == ("create", "configmap") and step.mode == "apply"
            data = {}
            for arg in argv[6:]:
                if arg.startswith("--from-literal="):
                    key, _, value = arg.removeprefix("--from-literal=").partition("=")
                    data[key] = value
                elif arg.startswith("--from-file="):
                    key, _, path = arg.removeprefix("--from-file=").partition("=")
                    data[key] = (manifests.ROOT / path).read_text()
            objects[("configmap", argv[5])] = {"data": data}
    return objects


def normalized_ksvc(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    meta = {k: doc["metadata"][k] for k in ("name", "namespace", "labels")}
    template = doc["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    container.pop("name", None)
    for ref in container.get("envFrom", []):
        # kustomize's configMapGenerator appends a content hash to the name.
        ref["configMapRef"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", ref["configMapRef"]["name"])
    container["env"] = {e["name"]: e["value"] for e in container["env"]}
    container["volumeMounts"] = {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in container["volumeMounts"]}
    volumes = {}
    for volume in spec.pop("volumes"):
        name = volume.pop("name")
        if "secret" in volume:
            volume["secret"].pop("optional", None)  # kn cannot say it (deploy/kn.py)
        if "emptyDir" in volume:
            volume["emptyDir"] = {k: v for k, v in volume["emptyDir"].items() if v}
        volumes[name] = volume
    spec["volumes"] = volumes
    return {"metadata": meta, "template": template, "traffic": doc["spec"]["traffic"]}


def test_kn_services_carry_the_settings_of_the_manifests(production):
    objects = applied(kn.plan(IMAGE, "production"))
    manifest = {d["metadata"]["name"]: d for d in production if ksvc(d)}
    assert {name for kind, name in objects if kind == "ksvc"} == set(manifest) == set(SERVICES)
    for name, doc in manifest.items():
        assert normalized_ksvc(objects[("ksvc", name)]) == normalized_ksvc(doc), name
    # The one thing the patch after kn adds.
    (create,) = [s for s in kn.plan(IMAGE) if s.argv[:4] == ("kn", "service", "create", "intake")]
    assert kn_service(create.argv)["spec"]["template"]["spec"]["containers"][0]["securityContext"] == STRICT


def test_a_manifest_change_shows_as_a_difference(production):
    """The comparison is not blind: a setting changed on one side only fails it."""
    doc = copy.deepcopy(next(d for d in production if ksvc(d) and d["metadata"]["name"] == "remediation"))
    objects = applied(kn.plan(IMAGE, "production"))
    assert normalized_ksvc(objects[("ksvc", "remediation")]) == normalized_ksvc(doc)
    for mutate in (lambda d: d["spec"]["template"]["spec"].update(timeoutSeconds=180),
                   lambda d: d["spec"]["template"]["metadata"]["annotations"].update({"autoscaling.knative.dev/min-scale": "1"}),
                   lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": "1"}),
                   lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")):
        changed = copy.deepcopy(doc)
        mutate(changed)
        assert normalized_ksvc(objects[("ksvc", "remediation")]) != normalized_ksvc(changed)


def _as_sink(spec: dict, namespace: str = "production") -> dict:
    if spec.get("uri", "").startswith("/"):
        return {"uri": f"http://{spec['ref']['name']}.{namespace}.svc.cluster.local{spec['uri']}"}
    return spec


def test_kn_broker_triggers_and_sources_match_the_manifests(production):
    objects = applied(kn.plan(IMAGE, "production"))
    kinds = {"Broker": "broker", "Trigger": "trigger", "PingSource": "pingsource", "SinkBinding": "sinkbinding"}
    expected = {(kinds[d["kind"]], d["metadata"]["name"]): d for d in production if d["kind"] in kinds}
    made = {key for key in objects if key[0] in kinds.values()}
    assert made == set(expected)
    for key, doc in expected.items():
        spec = copy.deepcopy(doc["spec"])
        if key[0] == "trigger":
            spec["subscriber"] = _as_sink(spec["subscriber"])
        if key[0] in ("pingsource", "sinkbinding"):
            spec["sink"] = _as_sink(spec["sink"])
        assert objects[key]["spec"] == spec, key


def test_kn_configmaps_hold_what_kustomize_generates(production):
    objects = applied(kn.plan(IMAGE, "production"))
    for doc in production:
        if doc["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])
            assert objects[("configmap", name)]["data"] == doc["data"], name


def test_an_update_returns_a_pinned_service_to_latest():
    (step,) = [s for s in kn.plan(IMAGE) if s.argv[:4] == ("kn", "service", "create", "query")]
    assert step.mode == "create-or-update"
    created = kn_service(step.argv)
    pinned = kn_service(("kn", "service", "update", "query", "--traffic", "query-00003=100"), created)
    assert pinned["spec"]["traffic"] == [{"revisionName": "query-00003", "latestRevision": False, "percent": 100}]
    again = kn_service(kn.update_argv(step), pinned)
    assert again["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]


def test_skipping_an_optional_secret_drops_its_mount_and_variable():
    plan = kn.plan(IMAGE, skip=frozenset({"slack-webhook"}))
    escalation = applied(plan)[("ksvc", "escalation")]
    container = escalation["spec"]["template"]["spec"]["containers"][0]
    assert "SLACK_WEBHOOK_URL_FILE" not in {e["name"] for e in container["env"]}
    assert "PAGERDUTY_ROUTING_KEY_FILE" in {e["name"] for e in container["env"]}
    assert "slack-webhook" not in {v["name"] for v in escalation["spec"]["template"]["spec"]["volumes"]}
    with pytest.raises(ValueError):
        kn.plan(IMAGE, skip=frozenset({"incident-db"}))


def test_the_script_is_valid_shell_with_every_step():
    text = kn.script("registry.example.com/incident-response:1.0.0")
    assert subprocess.run(["sh", "-n"], input=text, text=True).returncode == 0
    for step in kn.plan("registry.example.com/incident-response:1.0.0"):
        assert shlex.join(step.argv) in text
    assert text.count("--traffic @latest=100") == len(SERVICES)
