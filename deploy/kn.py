"""``make kn-commands``: the deployment as ``kn`` (and, where kn has no
command, ``kubectl``) commands, written from the same table as the
manifests (deploy/services.py, deploy/manifests.py's Secret and config
tables, knative/base's Broker, Triggers and sources), so both ways of
deploying configure the same thing; tests/test_kn.py reads the commands
back the way kn applies them and compares the result with the manifests.

    python -m deploy.kn --image registry.example.com/incident-response:1.0.0 \\
        [--namespace production] [--skip-secret pagerduty-key ...] > deploy-kn.sh

What kn cannot say, and what the script does instead:
- ``readOnlyRootFilesystem``: ``--security-context strict`` leaves it out,
  so a JSON patch adds it after each ``kn service create``/``update``.
- A Trigger's own ``delivery`` and a PingSource's ``contentType``: kn has
  no flag for them, so a merge patch sets them.
- A Secret volume marked ``optional``: kn mounts every Secret it is given
  as required. Leave out (``--skip-secret``) the optional Secrets you did
  not create: the function then says that channel is off.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass

import yaml

from deploy.manifests import (BASE, CONFIG_FILES, COPIES, HEALTH_PATH, OPTIONAL_SECRETS, PROBES, PROCESS_MODEL, PROXY_HOPS,
                              SECRET_MOUNTS, STABLE_HOPS, SECRETS, process_model)
from deploy.services import MAX_SCALE, SERVICES

BROKER = "incidents"


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    # How the script runs it: as is, piped into `kubectl apply -f -`, or
    # `kn service create` when the Service is new and `update` when not.
    mode: str = "run"  # run | apply | create-or-update


def _probe_opts(probe: dict) -> str:
    names = {"periodSeconds": "PeriodSeconds", "timeoutSeconds": "TimeoutSeconds", "failureThreshold": "FailureThreshold",
             "initialDelaySeconds": "InitialDelaySeconds", "successThreshold": "SuccessThreshold"}
    return ",".join(f"{names[key]}={value}" for key, value in probe.items() if key in names)


def service_flags(name: str, image: str, namespace: str, production: bool, skip: frozenset[str]) -> list[str]:
    row = SERVICES[name]
    flags = ["--namespace", namespace, "--image", image, "--port", "8080", "--service-account", row.account]
    env = {"FUNCTION_SOURCE": f"functions/{row.function}/main.py", "FUNCTION_TARGET": row.function,
           "THREADS": str(row.concurrency)}
    volumes = [("tmp", "emptyDir:tmp:type=Memory,size=16Mi", "/tmp")]
    for secret, (key, variable, users) in SECRET_MOUNTS.items():
        if name in users and secret not in skip:
            env[variable] = f"{SECRETS}/{secret}/{key}"
            volumes.append((secret, f"secret:{secret}", f"{SECRETS}/{secret}"))
    if name in CONFIG_FILES:
        configmap, filename, variable, path = CONFIG_FILES[name]
        env[variable] = f"{path}/{filename}"
        volumes.append((configmap, f"cm:{configmap}", path))
    env.update(row.env)
    if name in PROXY_HOPS:
        env["TRUSTED_PROXY_HOPS"] = PROXY_HOPS[name]
    for variable, value in env.items():
        flags += ["--env", f"{variable}={value}"]
    flags += ["--env-from", "cm:incident-response-config"]
    for volume, source, path in volumes:
        flags += ["--volume", f"{volume}={source}", "--mount", f"{path}={volume}"]
    flags += ["--scale-min", str(row.warm if production else 0), "--scale-max", str(MAX_SCALE),
              "--scale-target", str(row.concurrency), "--concurrency-limit", str(row.concurrency),
              "--timeout", str(row.timeout)]
    if row.public:
        flags += ["--no-cluster-local"]
        if name in STABLE_HOPS:
            # The activator out of the path but at scale from zero (deploy/manifests.py STABLE_HOPS).
            flags += ["--annotation-revision", "autoscaling.knative.dev/target-burst-capacity=0"]
    else:
        # Keeps the activator in every request's path (see networkpolicy.yaml).
        flags += ["--cluster-local", "--annotation-revision", "autoscaling.knative.dev/target-burst-capacity=-1"]
    labels = {"app.kubernetes.io/part-of": "incident-response", "app.kubernetes.io/component": name}
    for label, value in labels.items():
        flags += ["--label-revision", f"{label}={value}"]
    service_labels = {**labels, "app.kubernetes.io/name": "incident-response"}
    if row.publishes:
        service_labels["incident-response/publishes-events"] = "true"  # the SinkBinding's selector
    for label, value in service_labels.items():
        flags += ["--label-service", f"{label}={value}"]
    # Why one worker with containerConcurrency threads, said on the Service.
    flags += ["--annotation-service", f"{PROCESS_MODEL}={process_model(row.concurrency)}"]
    flags += ["--request", "cpu=50m,memory=96Mi", "--limit", f"cpu=1,memory={row.memory}"]
    for kind, probe in (("readiness", PROBES["readinessProbe"]), ("liveness", PROBES["livenessProbe"])):
        flags += [f"--probe-{kind}", f"http:::{HEALTH_PATH}", f"--probe-{kind}-opts", _probe_opts(probe)]
    flags += ["--security-context", "strict"]
    return flags


READ_ONLY_ROOT = [{"op": "add", "path": "/spec/template/spec/containers/0/securityContext/readOnlyRootFilesystem", "value": True}]


def service_steps(name: str, image: str, namespace: str, production: bool, skip: frozenset[str]) -> list[Step]:
    return [
        Step(("kn", "service", "create", name, *service_flags(name, image, namespace, production, skip)), "create-or-update"),
        Step(("kubectl", "-n", namespace, "patch", "ksvc", name, "--type", "json", "-p", json.dumps(READ_ONLY_ROOT))),
    ]


def _base(filename: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((BASE / filename).read_text()) if d]


def _sink(spec: dict, namespace: str) -> str:
    """A manifest's ref (and relative uri) as kn's --sink: ``ksvc:name`` or
    ``broker:name``, or the Service's cluster address when a path is added."""
    ref, uri = spec.get("ref"), spec.get("uri")
    prefix = {"Service": "ksvc", "Broker": "broker"}[ref["kind"]]
    if not uri:
        return f"{prefix}:{ref['name']}"
    assert prefix == "ksvc" and uri.startswith("/"), spec
    return f"http://{ref['name']}.{namespace}.svc.cluster.local{uri}"


def _merge_patch(kind: str, name: str, namespace: str, patch: dict) -> Step:
    return Step(("kubectl", "-n", namespace, "patch", kind, name, "--type", "merge", "-p", json.dumps(patch, sort_keys=True)))


def eventing_steps(namespace: str) -> list[Step]:
    steps = []
    (broker,) = _base("broker.yaml")
    delivery = broker["spec"]["delivery"]
    steps.append(Step(("kn", "broker", "create", broker["metadata"]["name"], "--namespace", namespace,
                       "--retry", str(delivery["retry"]), "--backoff-policy", delivery["backoffPolicy"],
                       "--backoff-delay", delivery["backoffDelay"], "--timeout", delivery["timeout"],
                       "--dl-sink", _sink(delivery["deadLetterSink"], namespace))))
    # The same policy again, so that a later run changes an existing Broker too.
    steps.append(_merge_patch("broker", broker["metadata"]["name"], namespace, {"spec": {"delivery": delivery}}))
    for trigger in _base("triggers.yaml"):
        spec = trigger["spec"]
        name = trigger["metadata"]["name"]
        argv = ["kn", "trigger", "create", name, "--namespace", namespace, "--broker", spec["broker"]]
        for key, value in spec["filter"]["attributes"].items():
            argv += ["--filter", f"{key}={value}"]
        argv += ["--sink", _sink(spec["subscriber"], namespace)]
        steps.append(Step(tuple(argv)))
        if "delivery" in spec:
            steps.append(_merge_patch("trigger", name, namespace, {"spec": {"delivery": spec["delivery"]}}))
    (binding,) = _base("sinkbinding.yaml")
    subject = binding["spec"]["subject"]
    selector = ",".join(f"{k}={v}" for k, v in subject["selector"]["matchLabels"].items())
    group, version = subject["apiVersion"].split("/")
    steps.append(Step(("kn", "source", "binding", "create", binding["metadata"]["name"], "--namespace", namespace,
                       "--subject", f"{subject['kind']}:{group}/{version}:{selector}",
                       "--sink", _sink(binding["spec"]["sink"], namespace))))
    (ping,) = _base("pingsource.yaml")
    steps.append(Step(("kn", "source", "ping", "create", ping["metadata"]["name"], "--namespace", namespace,
                       "--schedule", ping["spec"]["schedule"], "--data", ping["spec"]["data"],
                       "--sink", _sink(ping["spec"]["sink"], namespace))))
    steps.append(_merge_patch("pingsource", ping["metadata"]["name"], namespace,
                              {"spec": {"contentType": ping["spec"]["contentType"]}}))
    return steps


def configmap_steps(namespace: str) -> list[Step]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    steps = []
    for generator in kustomization["configMapGenerator"]:
        argv = ["kubectl", "-n", namespace, "create", "configmap", generator["name"], "--dry-run=client", "-o", "yaml"]
        argv += [f"--from-literal={literal}" for literal in generator.get("literals", [])]
        argv += [f"--from-file={f.rsplit('/', 1)[-1]}=knative/base/{f}" for f in generator.get("files", [])]
        steps.append(Step(tuple(argv), "apply"))
    assert {f"config/{name}" for name in COPIES} <= {f for g in kustomization["configMapGenerator"] for f in g.get("files", [])}
    return steps


def plan(image: str, namespace: str = "production", production: bool = True,
         skip: frozenset[str] = frozenset()) -> list[Step]:
    unknown = skip - set(OPTIONAL_SECRETS)
    if unknown:
        raise ValueError(f"only optional Secrets can be left out, not {sorted(unknown)}")
    steps = configmap_steps(namespace)
    for name in SERVICES:
        steps += service_steps(name, image, namespace, production, skip)
    return steps + eventing_steps(namespace)


def update_argv(step: Step) -> tuple[str, ...]:
    """``kn service update`` with the settings of a create step. An update
    also ends a rollback's pin (docs/deploy.md, "Roll back")."""
    assert step.mode == "create-or-update"
    return ("kn", "service", "update", *step.argv[3:], "--traffic", "@latest=100")


def _line(step: Step) -> str:
    text = shlex.join(step.argv)
    if step.mode == "apply":
        return f"{text} | kubectl apply -f -"
    if step.mode == "create-or-update":
        name, namespace = step.argv[3], step.argv[step.argv.index("--namespace") + 1]
        update = shlex.join(update_argv(step))
        return f"if kn service describe {shlex.quote(name)} -n {shlex.quote(namespace)} >/dev/null 2>&1; then\n  {update}\nelse\n  {text}\nfi"
    if step.argv[:2] in (("kn", "broker"), ("kn", "trigger"), ("kn", "source")):
        # Created once; a later run keeps them (the patches after them still apply).
        kind, name = (f"source {step.argv[2]}", step.argv[4]) if step.argv[1] == "source" else (step.argv[1], step.argv[3])
        namespace = step.argv[step.argv.index("--namespace") + 1]
        return f"kn {kind} describe {shlex.quote(name)} -n {shlex.quote(namespace)} >/dev/null 2>&1 || {text}"
    return text


def script(image: str, namespace: str = "production", skip: frozenset[str] = frozenset()) -> str:
    lines = ["#!/bin/sh", "# Generated by `python -m deploy.kn` (make kn-commands) from deploy/services.py.",
             "# Before it: the Secrets (docs/deploy.md step 3); RBAC, the NetworkPolicy, the",
             "# seed's incident-api Service and the migration Job are plain Kubernetes objects",
             "# (docs/deploy.md step 5 applies them with kubectl).", "set -eu"]
    lines += [_line(step) for step in plan(image, namespace, True, skip)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.kn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the pushed image, registry/incident-response:tag")
    parser.add_argument("--namespace", default="production")
    parser.add_argument("--skip-secret", action="append", default=[], choices=OPTIONAL_SECRETS,
                        help="an optional Secret you did not create (repeat)")
    args = parser.parse_args(argv)
    sys.stdout.write(script(args.image, args.namespace, frozenset(args.skip_secret)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
