"""The real Prometheus binary (Debian ``prometheus``) scraping a loopback
exporter with known series, so diagnostics read what PromQL really computes."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import requests

from loopback.servers import RecordingServer
from loopback.processes import free_port, terminate, wait_until

BINARY = shutil.which("prometheus")


class Exporter:
    """Every scrape adds 1,000 email-service requests (1 a 5xx) and 100
    latency observations: 90 ≤ 0.1 s, 8 ≤ 0.5 s, 2 ≤ 1 s. So availability is
    0.999 and the p95 latency 350 ms."""

    def __init__(self):
        self.scrapes = 0
        self.lag = 15234
        # Series a test adds, by key: exposition lines whose value may be
        # "+X", a counter that grows by X every scrape (so rate() is X/s).
        self.extra: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.server = RecordingServer(self._respond)

    def _respond(self, req):
        if req.path.startswith("/kafka"):
            return 200, {"Content-Type": "text/plain"}, b"kafka_server_up 1\n"
        with self._lock:
            self.scrapes += 1
            n = self.scrapes
        text = f"""# TYPE http_requests_total counter
http_requests_total{{service="email",code="200"}} {999 * n}
http_requests_total{{service="email",code="500"}} {n}
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{{service="email",le="0.1"}} {90 * n}
http_request_duration_seconds_bucket{{service="email",le="0.5"}} {98 * n}
http_request_duration_seconds_bucket{{service="email",le="1"}} {100 * n}
http_request_duration_seconds_bucket{{service="email",le="+Inf"}} {100 * n}
http_request_duration_seconds_sum{{service="email"}} {12 * n}
http_request_duration_seconds_count{{service="email"}} {100 * n}
# TYPE kafka_consumergroup_lag gauge
kafka_consumergroup_lag{{consumergroup="email-service",partition="0"}} {self.lag}
"""
        text += "".join(_line(line, n) + "\n" for key in sorted(self.extra) for line in self.extra[key])
        return 200, {"Content-Type": "text/plain; version=0.0.4"}, text.encode()


def _line(line: str, scrapes: int) -> str:
    series, _, value = line.rpartition(" ")
    return f"{series} {float(value[1:]) * scrapes:g}" if value.startswith("+") else line


CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: email-service
    static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]
  - job_name: kafka
    metrics_path: /kafka
    static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]
  - job_name: postgres
    static_configs: [{{targets: ['127.0.0.1:{dead}']}}]
"""


class Prometheus:
    def __init__(self, rules: str = ""):
        """``rules``: an alerting rules file (YAML), evaluated every second,
        so ALERTS carries what the test's series make fire."""
        self.rules = rules
        if BINARY is None:
            raise RuntimeError("prometheus is not installed (make test installs it)")
        self.exporter = Exporter()
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, promql: str) -> list:
        response = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def start(self) -> "Prometheus":
        self.exporter.server.start()
        config = self.dir / "prometheus.yml"
        text = CONFIG.format(exporter=self.exporter.server.port, dead=free_port())
        if self.rules:
            (self.dir / "rules.yml").write_text(self.rules)
            text += f"rule_files: ['{self.dir / 'rules.yml'}']\n"
        config.write_text(text)
        self.log = (self.dir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [BINARY, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: requests.get(self.url + "/-/ready", timeout=1).ok, 30, message="prometheus ready")
        # rate() needs two samples of every series; poll until PromQL answers.
        wait_until(lambda: self.query('up{job="postgres"}') and self.query('sum(rate(http_requests_total[5m])) > 0'),
                   30, interval=0.2, message="two scrapes")
        return self

    def stop(self):
        terminate(self.process)
        self.exporter.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
