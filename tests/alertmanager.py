"""The real AlertManager binary (Debian ``prometheus-alertmanager``), started
on loopback with a webhook receiver pointed at a function under test."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from loopback.processes import free_port, terminate, wait_until

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

CONFIG = """\
route:
  receiver: incident-webhook
  group_by: ['alertname', 'service']
  group_wait: 200ms
  group_interval: 1s
  repeat_interval: {repeat_interval}
receivers:
  - name: incident-webhook
    webhook_configs:
      - url: '{url}'
        send_resolved: true
        max_alerts: 0
        http_config:
          authorization:
            type: Bearer
            credentials_file: '{token_file}'
"""


class AlertManager:
    def __init__(self, webhook_url: str, token: str, repeat_interval: str = "2s"):
        if BINARY is None:
            raise RuntimeError("prometheus-alertmanager is not installed (make test installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="alertmanager-"))
        token_file = self.dir / "token"
        token_file.write_text(token)
        self.config_file = self.dir / "alertmanager.yml"
        self.config_file.write_text(CONFIG.format(url=webhook_url, token_file=token_file, repeat_interval=repeat_interval))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "AlertManager":
        self.log = (self.dir / "alertmanager.log").open("w")
        self.process = subprocess.Popen(
            [
                BINARY,
                f"--config.file={self.config_file}",
                f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: requests.get(self.url + "/-/ready", timeout=1).ok, 30, message="alertmanager ready")
        return self

    def fire(self, labels: dict, annotations: dict) -> None:
        """What the seed's Test 2 does with curl against AlertManager's API."""
        response = requests.post(self.url + "/api/v2/alerts", json=[{"labels": labels, "annotations": annotations}], timeout=5)
        response.raise_for_status()

    def resolve(self, labels: dict, annotations: dict) -> None:
        ended = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
        response = requests.post(
            self.url + "/api/v2/alerts",
            json=[{"labels": labels, "annotations": annotations, "endsAt": ended}],
            timeout=5,
        )
        response.raise_for_status()

    def logs(self) -> str:
        return (self.dir / "alertmanager.log").read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)
