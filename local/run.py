"""``make run``: the whole system on one machine, wired like production.

An embedded PostgreSQL (unless DATABASE_URL is set), the migrations, every
function as its own process on its own port (shared/serve.py, as the image
runs it), the local
Broker reading the real Trigger manifests in knative/, and the outbox sweep
the PingSource drives in Kubernetes. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from deploy.services import SERVICES

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
MANIFESTS = ROOT / "knative" / "base"
NAMESPACE = "default"
BROKER = "incidents"

# Every function as its own process, on the port the table gives it.
FUNCTIONS = SERVICES


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


@dataclass
class Process:
    name: str
    port: int
    popen: subprocess.Popen
    log_path: Path


@dataclass
class Stack:
    """Everything ``make run`` starts; the end-to-end tests start one too."""

    database_url: str
    token: str
    ports: dict[str, int]
    broker_port: int
    env: dict = field(default_factory=dict)
    duplicates: int = 1
    log_dir: Path = RUN_DIR / "logs"
    processes: list[Process] = field(default_factory=list)
    broker: object | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def sink(self) -> str:
        return f"http://127.0.0.1:{self.broker_port}/{NAMESPACE}/{BROKER}"

    def function_env(self, service: str) -> dict:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "DATABASE_URL": self.database_url,
               "INCIDENT_API_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}
        env.pop("INCIDENT_API_TOKEN_FILE", None)
        env.setdefault("PUBLIC_URL", self.url("query"))
        if SERVICES[service].publishes:
            env["K_SINK"] = self.sink
        env.update(SERVICES[service].env)
        return env

    def start_broker(self) -> None:
        from local.broker import LocalBroker, load_brokers

        services = {name: self.url(name) for name in FUNCTIONS}
        brokers = load_brokers(MANIFESTS, services, NAMESPACE)
        self._shorten_delivery(brokers)
        self.broker = LocalBroker(brokers, self.broker_port, duplicates=self.duplicates).start()

    def _shorten_delivery(self, brokers) -> None:
        """LOCAL_BROKER_RETRY / LOCAL_BROKER_BACKOFF_SECONDS replace the
        manifests' delivery timing (tests must not wait a production backoff)."""
        from dataclasses import replace

        changes = {}
        if "LOCAL_BROKER_RETRY" in self.env:
            changes["retry"] = int(self.env["LOCAL_BROKER_RETRY"])
        if "LOCAL_BROKER_BACKOFF_SECONDS" in self.env:
            changes["backoff_delay"] = float(self.env["LOCAL_BROKER_BACKOFF_SECONDS"])
        if not changes:
            return
        for spec in brokers.values():
            spec.delivery = replace(spec.delivery, **changes)
            for trigger in spec.triggers:
                trigger.delivery = replace(trigger.delivery, **changes)

    def start_functions(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service, row in FUNCTIONS.items():
            target = row.function
            log_path = self.log_dir / f"{service}.log"
            env = {**self.function_env(service), "FUNCTION_SOURCE": str(ROOT / "functions" / target / "main.py"),
                   "FUNCTION_TARGET": target, "HOST": "127.0.0.1", "PORT": str(self.ports[service])}
            popen = subprocess.Popen(
                [sys.executable, "-m", "shared.serve"],
                env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                start_new_session=True,
            )
            self.processes.append(Process(service, self.ports[service], popen, log_path))

    def wait_ready(self, timeout: float = 60.0, announce=None) -> None:
        pending = {p.name: p for p in self.processes}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for name, proc in list(pending.items()):
                if proc.popen.poll() is not None:
                    tail = proc.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{tail}")
                try:
                    if requests.get(f"http://127.0.0.1:{proc.port}/health", timeout=1).status_code == 200:
                        pending.pop(name)
                        if announce:
                            announce(f"{name:<14} ready on http://127.0.0.1:{proc.port}")
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"not ready after {timeout:g}s: {', '.join(pending)} (logs in {self.log_dir})")

    def start_ping_source(self) -> None:
        """What the PingSource in knative/ does, on its schedule."""
        doc = yaml.safe_load((MANIFESTS / "pingsource.yaml").read_text())
        spec = doc["spec"]
        m = re.fullmatch(r"\*/(\d+) \* \* \* \*", spec["schedule"].strip())
        interval = int(m.group(1)) * 60 if m else 60
        interval = float(self.env.get("LOCAL_PING_INTERVAL_SECONDS", interval))
        target = self.url(spec["sink"]["ref"]["name"]) + spec["sink"].get("uri", "")

        def loop():
            n = 0
            while not self._stop.wait(interval):
                n += 1
                headers = {"ce-id": f"ping-{n}-{time.time_ns()}", "ce-source": f"/apis/v1/namespaces/{NAMESPACE}/pingsources/outbox-sweep",
                           "ce-specversion": "1.0", "ce-type": "dev.knative.sources.ping", "Content-Type": "application/json"}
                try:
                    requests.post(target, data=spec.get("data", "{}"), headers=headers, timeout=30)
                except requests.RequestException:
                    pass

        threading.Thread(target=loop, daemon=True, name="ping-source").start()

    def start(self, announce=None) -> "Stack":
        self.start_broker()
        if announce:
            announce(f"{'broker':<14} ready on {self.sink}")
        self.start_functions()
        self.wait_ready(announce=announce)
        self.start_ping_source()
        return self

    def stop(self) -> None:
        self._stop.set()
        for proc in self.processes:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in self.processes:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
        if self.broker is not None:
            self.broker.stop()


def _token() -> str:
    from shared.config import read_secret

    secret = read_secret(os.environ, "INCIDENT_API_TOKEN")
    if secret:
        return secret.reveal()
    path = RUN_DIR / "api-token"
    if not path.exists():
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _integrations() -> list[str]:
    env = os.environ
    lines = []
    kube = env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    lines.append(f"Kubernetes:  {'kubeconfig ' + kube if Path(kube).exists() else 'not configured (diagnostics say so; remediation cannot act)'}")
    lines.append(f"Prometheus:  {env.get('PROMETHEUS_URL') or 'not configured (PROMETHEUS_URL)'}")
    lines.append(f"Remediation: {env.get('REMEDIATION_MODE', 'dry-run')} (allowed namespaces: {env.get('REMEDIATION_ALLOWED_NAMESPACES') or 'none'})")
    pd = env.get("PAGERDUTY_ROUTING_KEY") or env.get("PAGERDUTY_ROUTING_KEY_FILE")
    lines.append(f"PagerDuty:   {'on' if pd else 'off (PAGERDUTY_ROUTING_KEY) - nobody is paged'}")
    slack = env.get("SLACK_WEBHOOK_URL") or env.get("SLACK_WEBHOOK_URL_FILE")
    lines.append(f"Slack:       {'on' if slack else 'off (SLACK_WEBHOOK_URL)'}")
    return lines


def main() -> None:
    from shared.config import ConfigError, parse_database_url
    from shared import migrate

    # Locally, dry-run remediation may consider the seed's namespace so the
    # demo shows what would be done; production's default allows none.
    os.environ.setdefault("REMEDIATION_ALLOWED_NAMESPACES", "production")

    embedded = None
    try:
        if os.environ.get("DATABASE_URL") or os.environ.get("DATABASE_URL_FILE"):
            from shared.config import read_secret

            database_url = parse_database_url(read_secret(os.environ, "DATABASE_URL").reveal())
            say("using DATABASE_URL")
        else:
            from local.embedded_pg import EmbeddedPostgres

            embedded = EmbeddedPostgres(int(os.environ.get("EMBEDDED_PG_PORT", "55432")))
            embedded.start()
            database_url = embedded.url
            say(f"{'postgresql':<14} ready on 127.0.0.1:{embedded.port} (data in .run/pgdata)")
        migrate.upgrade(database_url)
        say(f"{'migrations':<14} applied")
    except (ConfigError, RuntimeError) as exc:
        say(f"cannot start: {exc}")
        if embedded:
            embedded.stop()
        sys.exit(2)

    ports = {name: int(os.environ.get(row.port_variable, row.port)) for name, row in FUNCTIONS.items()}
    stack = Stack(database_url, _token(), ports, int(os.environ.get("BROKER_PORT", "8090")))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        stack.start(announce=say)
    except Exception as exc:  # noqa: BLE001 - say why, stop what started
        say(f"cannot start: {exc}")
        stack.stop()
        if embedded:
            embedded.stop()
        sys.exit(1)
    token_hint = "$(cat .run/api-token)" if not os.environ.get("INCIDENT_API_TOKEN") and not os.environ.get("INCIDENT_API_TOKEN_FILE") else "$INCIDENT_API_TOKEN"
    for line in _integrations():
        say(line)
    print(f"""
Incident Response is running. Logs: .run/logs/<function>.log

  Query API     {stack.url('query')}/incidents      (token: {token_hint})
  Board         {stack.url('query')}/ui
  Metrics       {stack.url('query')}/metrics
  Webhook       {stack.url('intake')}/webhook/alert
  Broker        {stack.sink}

Send the seed's Test 2 alert:

  curl -s -XPOST {stack.url('intake')}/webhook/alert \\
    -H "Authorization: Bearer {token_hint}" -H 'Content-Type: application/json' \\
    -d '{{"version":"4","status":"firing","receiver":"incident-webhook","alerts":[{{"status":"firing",
         "labels":{{"alertname":"TestIncident","severity":"critical","service":"email"}},
         "annotations":{{"summary":"Test incident creation","description":"This is a test"}}}}]}}'

  curl -s {stack.url('query')}/incidents?status=open -H "Authorization: Bearer {token_hint}" | jq

Or run `make demo` in another terminal. Ctrl-C stops everything.
""", flush=True)
    try:
        while not stopping.wait(1):
            for proc in stack.processes:
                if proc.popen.poll() is not None:
                    say(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
                    stopping.set()
    finally:
        say("stopping")
        stack.stop()
        if embedded:
            embedded.stop()
        say("stopped")


if __name__ == "__main__":
    main()
