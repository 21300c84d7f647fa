"""After the actions: did the *problem* go away? Asked of Prometheus.

A playbook's ``verify`` names a PromQL expression that must return a result
(become true) or an alert that must stop firing, within a window. Without
one, the incident's own alert must no longer be firing once the window has
passed (``ALERTS{alertname=..., alertstate="firing", ...}`` with the alert's
identifying labels). Inconclusive (Prometheus unreachable or refusing the
query) is not "not verified": nothing is reverted on a guess, a human is
told instead."""

from __future__ import annotations

import time
from dataclasses import dataclass

from functions.remediation.playbooks import Playbook
from shared import promapi
from shared.config import Settings
from shared.log import scrub
from shared.templating import promql_string, render, render_promql

# Labels that name what is alerting; external labels a Prometheus or
# AlertManager adds (cluster, replica) are not on ALERTS and would make the
# query match nothing, which would read as "stopped firing".
IDENTITY_LABELS = ("namespace", "deployment", "statefulset", "daemonset", "pod", "container", "service", "job", "instance", "node")


@dataclass
class Verdict:
    verified: bool | None  # None: inconclusive, or nothing to verify
    reason: str
    query: str | None = None


def alerts_query(alertname: str, labels: dict) -> str:
    matchers = [f'alertname="{promql_string(alertname)}"', 'alertstate="firing"']
    matchers += [f'{k}="{promql_string(str(labels[k]))}"' for k in IDENTITY_LABELS if labels.get(k)]
    return "ALERTS{" + ", ".join(matchers) + "}"


class Verifier:
    def __init__(self, config: Settings, poll_interval: float = 1.0):
        self.config = config
        self.poll_interval = poll_interval

    def _query(self, promql: str) -> list:
        return promapi.instant(self.config.prometheus_url, promql, self.config.probe_timeout_seconds)

    def check(self, incident: dict, playbook: Playbook, context: dict) -> Verdict:
        spec = playbook.verify
        window = spec.within_seconds if spec and spec.within_seconds else self.config.remediation_verify_window_seconds
        if not self.config.prometheus_url:
            if spec:
                return Verdict(None, "not verified: the playbook declares verify but PROMETHEUS_URL is not set")
            return Verdict(None, "")
        import requests  # Prometheus is asked only when PROMETHEUS_URL is set

        labels = incident.get("labels") or {}
        try:
            if spec and spec.promql:
                query = render_promql(spec.promql, context)
                return self._until(query, window, want_result=True)
            if spec and spec.alert_stops_firing:
                query = alerts_query(render(spec.alert_stops_firing, context), labels)
                return self._until(query, window, want_result=False)
            query = alerts_query(incident["alert_name"], labels)
            time.sleep(window)
            firing = self._query(query)
            if firing:
                return Verdict(False, f"not verified: {incident['alert_name']} is still firing {window:g}s after the actions", query)
            return Verdict(True, f"verified: {incident['alert_name']} stopped firing", query)
        except (requests.RequestException, RuntimeError, ValueError, KeyError) as exc:
            # The reason is stored and sent to people: no URL credentials in it.
            return Verdict(None, f"not verified: Prometheus could not be asked ({scrub(str(exc), 200)})")

    def _until(self, query: str, window: float, want_result: bool) -> Verdict:
        deadline = time.monotonic() + window
        while True:
            result = self._query(query)
            if bool(result) == want_result:
                what = "returned a result" if want_result else "stopped firing"
                return Verdict(True, f"verified: {query} {what}", query)
            if time.monotonic() >= deadline:
                what = "returned nothing" if want_result else "was still firing"
                return Verdict(False, f"not verified: {query} {what} {window:g}s after the actions", query)
            time.sleep(self.poll_interval)
