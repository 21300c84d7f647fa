"""``make bench`` section: the probable causes over the labelled cases
(tests/fixtures/diagnosis/), top-1 and top-3 by cause, and the diagnosis
time against the loopback Kubernetes API server and the real Prometheus.

Alone: ``python bench/diagnosis.py``."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS_PER_CASE = int(os.environ.get("BENCH_DIAGNOSIS_RUNS", "5"))
GOAL_MS = 500


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def diagnosis_section() -> list[str]:
    from functions.diagnostics.causes import VOCABULARY
    from functions.diagnostics.collector import Collector, load_probes
    from loopback.kube import FakeKubernetes
    from loopback.processes import wait_until
    from shared import config
    from tests.diagnosis_cases import PROBES, build, load_cases, load_into
    from tests.prometheus import BINARY, Prometheus

    cases = load_cases()
    # The cases whose source fails on purpose would print a warning per run.
    logging.getLogger("diagnostics").setLevel(logging.ERROR)
    k8s = FakeKubernetes().start()
    prometheus = Prometheus().start() if BINARY else None
    try:
        with tempfile.TemporaryDirectory() as tmp, k8s.as_cluster(Path(tmp)):
            if prometheus:
                prometheus.exporter.extra["diagnosis"] = [line for case in cases for line in build(case)[2]]
                wait_until(lambda: prometheus.query('sum by (namespace) (rate(container_cpu_cfs_periods_total[5m])) > 0')
                           and len(prometheus.query("dependency_up")) == sum(len(c.spec.get("dependencies") or {}) for c in cases),
                           30, interval=0.2, message="case series scraped")
            settings = config.load_settings({
                "DATABASE_URL": "postgresql://bench@127.0.0.1/unused", "INCIDENT_API_TOKEN": "bench-" + "x" * 40,
                "PROMETHEUS_URL": prometheus.url if prometheus else "",
            })
            collector = Collector(settings, load_probes(str(PROBES)))
            by_cause: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
            times: list[float] = []
            misses: list[str] = []
            for case in cases:
                load_into(k8s, case)
                collector.collect(case.incident())  # warm: connections, imports
                for _ in range(RUNS_PER_CASE):
                    started = time.perf_counter()
                    d = collector.collect(case.incident())
                    times.append((time.perf_counter() - started) * 1000)
                ranked = [c["cause"] for c in d["probable_causes"]]
                by_cause[case.expected].append((ranked[:1] == [case.expected], case.expected in ranked[:3]))
                if ranked[:1] != [case.expected]:
                    misses.append(f"`{case.name}`: labelled `{case.expected}`, ranked {', '.join(f'`{c}`' for c in ranked[:3])}")
    finally:
        k8s.stop()
        if prometheus:
            prometheus.stop()

    results = [r for rows in by_cause.values() for r in rows]
    top1 = sum(r[0] for r in results) / len(results)
    top3 = sum(r[1] for r in results) / len(results)
    p50, p95 = pct(times, 50), pct(times, 95)
    rows = ["## 7. Diagnosis", "",
            f"{len(results)} labelled cases (tests/fixtures/diagnosis/), each a cluster state served by the loopback Kubernetes API "
            f"through the official client{', with its series in the real Prometheus' if prometheus else ' (Prometheus not installed: no series)'}; "
            f"each diagnosed {RUNS_PER_CASE} times after one warm-up. Baseline: the goal of {GOAL_MS} ms a diagnosis.", "",
            "| Cause | Cases | Top-1 | Top-3 |", "|---|---|---|---|"]
    for cause in VOCABULARY:
        got = by_cause.get(cause, [])
        if got:
            rows.append(f"| `{cause}` | {len(got)} | {sum(r[0] for r in got)}/{len(got)} | {sum(r[1] for r in got)}/{len(got)} |")
    rows += [f"| **all** | {len(results)} | {top1:.0%} | {top3:.0%} |", "",
             f"Diagnosis time: p50 {p50:.0f} ms, p95 {p95:.0f} ms ({p95 / GOAL_MS:.2f} × the goal), over {len(times)} runs.", ""]
    if misses:
        rows += ["Not ranked first:", ""] + [f"- {m}" for m in misses] + [""]
    return rows


if __name__ == "__main__":
    from shared import log as logs

    logs.configure("WARNING")
    print("\n".join(diagnosis_section()))
