"""``make bench``: every figure next to a baseline measured in the same run,
because this machine is shared and noisy. Bounded (about four minutes), all
traffic on loopback, stops by itself. Prints a Markdown report and writes it
to docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local.run import FUNCTIONS, Stack  # noqa: E402
from shared import db, migrate  # noqa: E402
from shared.alerts import label_fingerprint  # noqa: E402
from loopback.kube import FakeKubernetes, deployment, pod  # noqa: E402
from loopback.notify import pagerduty, slack  # noqa: E402
from loopback.processes import FunctionProcess, free_port, wait_until  # noqa: E402
from bench.diagnosis import diagnosis_section  # noqa: E402

TOKEN = "bench-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CONCURRENCY = 8
DURATION = float(os.environ.get("BENCH_SECONDS", "15"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
THREADS = 8
VENV_BIN = Path(sys.executable).parent


def server_url() -> str:
    raw = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
    from shared.config import parse_database_url

    return parse_database_url(raw)


def with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def alert(name: str, **labels) -> dict:
    labels = {"alertname": name, "severity": "critical", **labels}
    return {"status": "firing", "labels": labels, "annotations": {"summary": f"{name} bench"},
            "startsAt": "2026-11-27T10:00:00Z", "fingerprint": label_fingerprint(labels)}


def webhook(alerts: list[dict]) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "receiver": "bench", "groupKey": "{}", "alerts": alerts}).encode()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


# --------------------------------------------------------------------------- load


async def _load(url: str, body_for, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal errors
            while time.monotonic() < deadline:
                body = body_for(next(counter))
                start = time.perf_counter()
                async with session.post(url, data=body, headers=AUTH) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"rps": len(latencies) / elapsed, "p50": pct(latencies, 50), "p99": pct(latencies, 99), "n": len(latencies), "errors": errors}


def load(url: str, body_for, seconds: float = DURATION) -> dict:
    return asyncio.run(_load(url, body_for, seconds, CONCURRENCY))


WRK_SCRIPT = ROOT / "bench" / "wrk_new_alert.lua"
WRK_CONNECTIONS = (1, 8, 32)
WRK_SECONDS = float(os.environ.get("BENCH_WRK_SECONDS", "8"))
WRK_ROUNDS = int(os.environ.get("BENCH_WRK_ROUNDS", "2"))
# Enough connections that every worker of the reference's gunicorn takes some.
WARM_UP_CONNECTIONS = 32
WARM_UP_SECONDS = 3.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a server's process tree (the reference's gunicorn master and workers)."""
    return _proc_cpu([pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()])


def _proc_cpu(pids) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def database_cpu(engine) -> dict[int, float]:
    """CPU seconds so far of every server process connected to the bench's
    database (this connection's aside), by pid: PostgreSQL's share of what
    a request costs, which the server's own CPU leaves out."""
    with engine.connect() as conn:
        pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid()")).scalars().all()
    # Only a server on this machine: a remote one's pids name other processes here.
    return {p: _proc_cpu([p]) for p in pids if _is_postgres(p)}


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith(("postgres", "postmaster"))
    except OSError:
        return False


def database_cpu_since(engine, before: dict[int, float]) -> float:
    """CPU seconds the database's server processes used since ``before``
    (a process that started since counts whole; one that ended is lost,
    which the pools' steady connections make rare)."""
    now = database_cpu(engine)
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


def wrk(url: str, connections: int, seconds: float = WRK_SECONDS, pid: int | None = None, engine=None) -> dict:
    """wrk, one thread, ``connections`` kept-alive connections, one new alert
    per webhook (bench/wrk_new_alert.lua); percentiles from wrk's own
    histogram, which records every request (no coordinated sampling). With
    the server's ``pid``, also its CPU milliseconds per request: on a shared
    machine the share of the CPU a run gets varies from run to run, the CPU
    each request costs much less."""
    before = cpu_seconds(pid) if pid else None
    db_before = database_cpu(engine) if engine is not None else None
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("make bench needs wrk (scripts/ensure-system-packages.sh installs it)")
    out = subprocess.run([binary, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(WRK_SCRIPT), url],
                         capture_output=True, text=True, env={**os.environ, "WRK_TOKEN": TOKEN}, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    data = json.loads(line.split(" ", 1)[1])
    cpu_ms = (cpu_seconds(pid) - before) * 1000 / max(1, data["requests"]) if pid else float("nan")
    db_ms = database_cpu_since(engine, db_before) * 1000 / max(1, data["requests"]) if db_before else float("nan")
    return {"rps": data["requests"] / (data["duration_us"] / 1e6), "p50": data["p50_us"] / 1000, "p99": data["p99_us"] / 1000,
            "max": data["max_us"] / 1000, "n": data["requests"], "errors": data["errors"], "cpu_ms": cpu_ms, "db_ms": db_ms}


def reference_server(database_url: str, one_process: bool = False) -> subprocess.Popen:
    """The reference in gunicorn (WORKERS workers × THREADS threads), or
    with ``one_process`` as the functions are served (bench/reference_served.py:
    one process, waitress with THREADS threads and shared/serve.py's settings)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    if one_process:
        command = [str(VENV_BIN / "python"), "reference_served.py"]
        env.update(HOST="127.0.0.1", PORT=str(port), THREADS=str(THREADS), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}")
    else:
        command = [str(VENV_BIN / "gunicorn"), "--workers", str(WORKERS), "--threads", str(THREADS), "--bind", f"127.0.0.1:{port}",
                   "reference_app:app"]
    proc = subprocess.Popen(command, cwd=ROOT / "bench", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.post(proc.url + "/webhook/alert", data=webhook([]), headers=AUTH, timeout=1).ok, 30, message="reference")
    return proc


def pgbench(database_url: str, clients: int, seconds: int = 8) -> float:
    binary = shutil.which("pgbench") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None)
    if binary is None:
        return float("nan")
    parts = urlsplit(database_url)
    script = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
    script.write(
        "\\set n random(1, 2000000000)\n"
        "INSERT INTO incidents (id, alert_name, priority, status, summary, fingerprint, labels, source) "
        "VALUES (gen_random_uuid()::text, 'Bench', 'P0', 'open', 'bench', 'pg-' || :n || '-' || :client_id, '{}'::jsonb, 'alertmanager') "
        "ON CONFLICT (fingerprint) WHERE status IN ('open', 'investigating') DO UPDATE SET updated_at = now();\n"
    )
    script.close()
    env = {**os.environ, "PGPASSWORD": parts.password or ""}
    out = subprocess.run(
        [str(binary), "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-f", script.name,
         "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432), "-U", parts.username or "postgres", parts.path.strip("/")],
        capture_output=True, text=True, env=env,
    )
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return float("nan")


# --------------------------------------------------------------------------- sections


REFERENCE_ONE = "reference, one process"


def throughput(database_url: str, engine) -> list[str]:
    env = {"DATABASE_URL": database_url, "INCIDENT_API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"}
    # As knative/base/services.yaml runs it: one process, THREADS threads.
    intake = FunctionProcess("intake", env, threads=THREADS).start()
    reference = reference_server(database_url)
    # The same service in the functions' process model: what one process's
    # interpreter allows a one-INSERT Flask service on this machine.
    reference_one = reference_server(database_url, one_process=True)
    try:
        # Warm-up, not measured: the intake builds its handlers on its first
        # request (shared/http.py LazyRoutes), the reference's gunicorn
        # workers import theirs, and both open their pool's database
        # connections as requests need them. Measured from a cold start, the
        # first round paid a second or so of that inside its 8 s: at one
        # connection wrk's latency correction turned one such request into a
        # p99 of half a second, and its CPU into double the CPU per request.
        # Cold start is section 5's measure; this one is the steady state.
        for server in (intake, reference, reference_one):
            wrk(server.url + "/webhook/alert", WARM_UP_CONNECTIONS, WARM_UP_SECONDS)
        # wrk first: rounds alternate intake and reference at each connection
        # count, so both see the same machine load; the median round is kept.
        by_wrk: dict[tuple[str, int], list[dict]] = {}
        for _ in range(WRK_ROUNDS):
            for connections in WRK_CONNECTIONS:
                servers = [("intake", intake, intake.process.pid), ("reference", reference, reference.pid),
                           (REFERENCE_ONE, reference_one, reference_one.pid)]
                for label, server, pid in servers:
                    by_wrk.setdefault((label, connections), []).append(
                        wrk(server.url + "/webhook/alert", connections, pid=pid, engine=engine))
        run = uuid.uuid4().hex[:6]
        new = lambda i: webhook([alert("BenchNew", run=run, i=str(i))])  # noqa: E731
        intake_new = load(intake.url + "/webhook/alert", new)
        dup_body = webhook([alert("BenchDup", run=run)])
        intake_dup = load(intake.url + "/webhook/alert", lambda i: dup_body)
        run2 = uuid.uuid4().hex[:6]
        ref_new = load(reference.url + "/webhook/alert", lambda i: webhook([alert("RefNew", run=run2, i=str(i))]))
        ref_dup_body = webhook([alert("RefDup", run=run2)])
        ref_dup = load(reference.url + "/webhook/alert", lambda i: ref_dup_body)
    finally:
        reference.terminate()
        reference_one.terminate()
        intake.stop()
    pg1, pg4 = pgbench(database_url, 1), pgbench(database_url, 4)
    rows = [
        "## 1. Intake throughput and latency",
        "",
        f"Concurrency {CONCURRENCY}, {DURATION:g} s each, one alert per webhook; the intake as the Knative manifests run it "
        f"(shared/serve.py: one process, waitress with {THREADS} threads), the reference (bench/reference_app.py: Flask + "
        f"SQLAlchemy + pg8000, one INSERT … ON CONFLICT per alert) in gunicorn with {WORKERS} workers × {THREADS} threads. "
        "PostgreSQL ceiling: the same INSERT … ON CONFLICT through `pgbench -M prepared`.",
        "",
        "| Case | req/s | p50 ms | p99 ms | errors | ÷ reference | ÷ pgbench 1 client | ÷ pgbench 4 clients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result, ref in (("intake, every alert new", intake_new, ref_new), ("intake, every alert a duplicate", intake_dup, ref_dup),
                               ("reference, new", ref_new, ref_new), ("reference, duplicate", ref_dup, ref_dup)):
        rows.append(f"| {label} | {result['rps']:.0f} | {result['p50']:.1f} | {result['p99']:.1f} | {result['errors']} | "
                    f"{result['rps'] / ref['rps']:.2f} | {result['rps'] / pg1:.2f} | {result['rps'] / pg4:.2f} |")
    rows += ["", f"pgbench: {pg1:.0f} tps with 1 client, {pg4:.0f} tps with 4 clients.", ""]
    rows += ["### With wrk", "",
             f"`wrk -t1 -cN` ({WRK_SECONDS:g} s per run, {WRK_ROUNDS} rounds alternating the servers at each N, after "
             f"{WARM_UP_SECONDS:g} s of warm-up at {WARM_UP_CONNECTIONS} connections for each server, not counted, so every process "
             "has built its handlers and opened its connections; the round "
             "with the median throughput is shown, p99 is the worse of the rounds), one new alert per webhook "
             "(bench/wrk_new_alert.lua), same servers as above, and the reference once more as the functions are served "
             f"(*{REFERENCE_ONE}*: one process, waitress with {THREADS} threads and shared/serve.py's settings, "
             "bench/reference_served.py), for what one interpreter allows a one-INSERT "
             "Flask service on this machine. "
             "CPU ms/req, the median of the rounds (steadier than req/s on a shared machine): *server*, its processes' CPU "
             "time during the run ÷ its requests; *database*, the CPU time of the PostgreSQL server processes connected to the "
             "bench's database over the same run ÷ the same requests. On 2 cores the two together bound the throughput.", "",
             "| Connections | server | req/s | p50 ms | p99 ms | errors | ÷ reference | server CPU ms/req | database CPU ms/req "
             "| all CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for connections in WRK_CONNECTIONS:
        theirs = _median_run(by_wrk[("reference", connections)])
        for label in ("intake", "reference", REFERENCE_ONE):
            runs = by_wrk.get((label, connections))
            if not runs:
                continue
            a = _median_run(runs)
            server_ms, db_ms = statistics.median(r["cpu_ms"] for r in runs), statistics.median(r["db_ms"] for r in runs)
            rows.append(f"| {connections} | {label} | {a['rps']:.0f} | {a['p50']:.1f} | {max(r['p99'] for r in runs):.1f} | "
                        f"{sum(r['errors'] for r in runs)} | {a['rps'] / theirs['rps']:.2f} | {server_ms:.2f} | {db_ms:.2f} | "
                        f"{server_ms + db_ms:.2f} |")
    rows += ["", f"Intake ÷ {REFERENCE_ONE}: " + ", ".join(
        f"N={c} {_median_run(by_wrk[('intake', c)])['rps'] / _median_run(by_wrk[(REFERENCE_ONE, c)])['rps']:.2f}"
        for c in WRK_CONNECTIONS) + "."]
    rows += ["", "Every round: " + "; ".join(
        f"{label} N={c}: " + ", ".join(f"{r['rps']:.0f}/s p99 {r['p99']:.0f} ms" for r in runs) for (label, c), runs in by_wrk.items()), ""]
    return rows


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def storm(database_url: str) -> list[str]:
    env = {"DATABASE_URL": database_url, "INCIDENT_API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"}
    intake = FunctionProcess("intake", env, threads=THREADS).start()
    try:
        http = requests.Session()

        def timed_post(body: bytes) -> float:
            start = time.perf_counter()
            assert http.post(intake.url + "/webhook/alert", data=body, headers=AUTH, timeout=60).status_code == 200
            return (time.perf_counter() - start) * 1000

        def half_open() -> float:
            run = uuid.uuid4().hex
            timed_post(webhook([alert("Half", run=run, i=str(i)) for i in range(500)]))
            return timed_post(webhook([alert("Half", run=run, i=str(i)) for i in range(1000)]))

        times = {
            "1,000 new alerts": [timed_post(webhook([alert("Storm", run=uuid.uuid4().hex, i=str(i)) for i in range(1000)])) for _ in range(5)],
            "1,000 alerts, half already open": [half_open() for _ in range(5)],
        }
        single = [timed_post(webhook([alert("Single", run=uuid.uuid4().hex)])) for _ in range(20)]
    finally:
        intake.stop()
    base = statistics.median(single)
    rows = ["## 2. Alert storm", "", "Wall time from POST to the `200` (all alerts committed), median of 5; baseline: a one-alert webhook on the same server.", "",
            "| Webhook | median ms | min ms | ÷ one-alert webhook |", "|---|---|---|---|"]
    for label, samples in times.items():
        rows.append(f"| {label} | {statistics.median(samples):.1f} | {min(samples):.1f} | {statistics.median(samples) / base:.1f} |")
    rows += [f"| one alert (baseline) | {base:.1f} | {min(single):.1f} | 1.0 |", ""]
    return rows


def pipeline(database_url: str, engine, log_dir: Path) -> tuple[list[str], dict]:
    kube = FakeKubernetes().start()
    kube.add_deployment(deployment("email-service", 3))
    kube.pods.extend(pod(f"email-service-{i}", {"app": "email-service"}) for i in range(3))
    pd, hook = pagerduty(), slack()
    pd.server.start(), hook.server.start()
    env = {"KUBECONFIG": str(kube.kubeconfig(log_dir)), "REMEDIATION_MODE": "dry-run", "REMEDIATION_ALLOWED_NAMESPACES": "production",
           "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": "B" * 32, "SLACK_WEBHOOK_URL": hook.url + "/x",
           "LOG_LEVEL": "WARNING", "PROMETHEUS_URL": ""}
    ports = {name: free_port() for name in FUNCTIONS}
    stack = Stack(database_url, TOKEN, ports, free_port(), env=env, log_dir=log_dir).start()
    posted: dict[str, float] = {}
    try:
        http = requests.Session()
        for i in range(200):
            body = webhook([alert("EmailServiceDown", service="email", namespace="production", i=str(i), run=uuid.uuid4().hex[:6])])
            at = time.time()
            r = http.post(stack.url("intake") + "/webhook/alert", data=body, headers=AUTH, timeout=10)
            posted[r.json()["results"][0]["incident_id"]] = at
            time.sleep(0.05)  # 20 alerts a second: latency, not saturation
        ids = list(posted)

        def finished():
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT count(DISTINCT incident_id) FROM incident_timeline WHERE kind = 'remediation_result' "
                                            "AND incident_id = ANY(:ids)"), {"ids": ids}).scalar() == len(ids)

        wait_until(finished, 600, interval=0.5, message="every pipeline")
        wait_until(lambda: len(pd.requests) >= len(ids), 300, interval=0.5, message="every page")
        time.sleep(1)
        with engine.connect() as conn:
            created = dict(conn.execute(sa.text("SELECT id, EXTRACT(EPOCH FROM created_at) FROM incidents WHERE id = ANY(:ids)"), {"ids": ids}).all())
            steps = conn.execute(sa.text(
                "SELECT incident_id, kind, details->>'channel', EXTRACT(EPOCH FROM min(at)) FROM incident_timeline "
                "WHERE incident_id = ANY(:ids) AND kind IN ('diagnosed', 'remediation_action', 'notification') GROUP BY 1, 2, 3"), {"ids": ids}).all()
        rss = {p.name: memory_of(p.popen.pid) for p in stack.processes}
    finally:
        stack.stop()
        kube.stop(), pd.server.stop(), hook.server.stop()
    stages = {"incident row": [], "diagnostics stored": [], "remediation recorded (dry-run)": [], "page sent": []}
    for incident_id, t in created.items():
        stages["incident row"].append((float(t) - posted[incident_id]) * 1000)
    for incident_id, kind, channel, t in steps:
        key = {"diagnosed": "diagnostics stored", "remediation_action": "remediation recorded (dry-run)"}.get(kind)
        if kind == "notification" and channel == "pagerduty":
            key = "page sent"
        if key:
            stages[key].append((float(t) - posted[incident_id]) * 1000)
    rows = ["## 3. Pipeline latency", "",
            "200 `EmailServiceDown` (P0) alerts through the local Broker with every function running; loopback Kubernetes, "
            "PagerDuty and Slack; remediation in dry-run. Milliseconds from the POST to each record (database clock).", "",
            "| Alert posted → | n | p50 ms | p99 ms |", "|---|---|---|---|"]
    for label, values in stages.items():
        rows.append(f"| {label} | {len(values)} | {pct(values, 50):.0f} | {pct(values, 99):.0f} |")
    rows.append("")
    return rows, rss


STORM_ALERTS = int(os.environ.get("BENCH_STORM_ALERTS", "10000"))
STORM_GROUP = 500  # alerts per webhook, as AlertManager's max_alerts bounds a group


def storm_to_pages(database_url: str, engine, log_dir: Path) -> list[str]:
    """A storm through the whole pipeline: how long until every alert is an
    incident, diagnosed, and paged. Baseline: the same pipeline for one alert."""
    pd, hook = pagerduty(), slack()
    pd.server.start(), hook.server.start()
    env = {"REMEDIATION_MODE": "off", "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": "B" * 32,
           "SLACK_WEBHOOK_URL": hook.url + "/x", "ANNOUNCE_ON_OPEN_PRIORITIES": "", "PAGE_ON_FAILURE_PRIORITIES": "",
           "LOG_LEVEL": "WARNING", "PROMETHEUS_URL": ""}
    ports = {name: free_port() for name in FUNCTIONS}
    stack = Stack(database_url, TOKEN, ports, free_port(), env=env, log_dir=log_dir).start()
    http = requests.Session()

    def completed(keys: list[str]) -> int:
        """Steps done, by the work claims each step completes once."""
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM work_claims WHERE key = ANY(:k) AND completed_at IS NOT NULL"),
                                {"k": keys}).scalar()

    def paged(ids: list[str]) -> int:
        return completed([f"notify:pagerduty:trigger:{i}:0:opened" for i in ids])

    def diagnosed(ids: list[str]) -> int:
        return completed([f"diagnostics:{i}:0" for i in ids])

    def run(n: int) -> dict[str, float]:
        run_id, ids = uuid.uuid4().hex[:8], []
        start = time.monotonic()
        for first in range(0, n, STORM_GROUP):
            body = webhook([alert("NodeDown", severity="critical", run=run_id, i=str(i)) for i in range(first, min(n, first + STORM_GROUP))])
            response = http.post(stack.url("intake") + "/webhook/alert", data=body, headers=AUTH, timeout=120)
            ids += [r["incident_id"] for r in response.json()["results"]]
        times = {"committed": time.monotonic() - start}
        wait_until(lambda: diagnosed(ids) == n, 3600, interval=1, message="every incident diagnosed")
        times["diagnosed"] = time.monotonic() - start
        wait_until(lambda: paged(ids) == n, 3600, interval=1, message="every incident paged")
        times["paged"] = time.monotonic() - start
        return times

    try:
        single = run(1)
        storm = run(STORM_ALERTS)
    finally:
        stack.stop()
        pd.server.stop(), hook.server.stop()
    rows = ["## 4. A storm through the whole pipeline", "",
            f"{STORM_ALERTS:,} P0 alerts in webhooks of {STORM_GROUP} through the local Broker with every function running "
            "(loopback PagerDuty; remediation off, so each incident is diagnosed and paged). Seconds from the first POST until every "
            "incident is committed, diagnosed and paged; per alert, against the same pipeline for one alert.", "",
            "| Every incident … | one alert s | storm s | storm per alert ms | ÷ one alert |", "|---|---|---|---|---|"]
    for stage in ("committed", "diagnosed", "paged"):
        per_alert = storm[stage] / STORM_ALERTS
        rows.append(f"| {stage} | {single[stage]:.2f} | {storm[stage]:.1f} | {per_alert * 1000:.1f} | {per_alert / single[stage]:.3f} |")
    rows.append("")
    return rows


SCALE_PROCESSES = int(os.environ.get("BENCH_SCALE_PROCESSES", "8"))
SCALE_POOL = int(os.environ.get("BENCH_SCALE_POOL", "4"))
SCALE_CONNECTIONS = 8  # the single process's load; the burst is ten times this


def scale_out(database_url: str) -> list[str]:
    """8 intake processes (one Knative pod each) through one
    PgBouncer in transaction pooling mode with a small server pool, hit by a
    10x burst; baseline: one intake process straight to PostgreSQL at the
    normal load, in the same run."""
    from loopback.pgbouncer import PgBouncer

    base_env = {"INCIDENT_API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"}
    single = FunctionProcess("intake", {**base_env, "DATABASE_URL": database_url}, threads=THREADS).start()
    try:
        one = wrk(single.url + "/webhook/alert", SCALE_CONNECTIONS)
    finally:
        single.stop()
    bouncer = PgBouncer(database_url, pool_size=SCALE_POOL, max_client_conn=SCALE_PROCESSES * 20).start()
    procs: list[FunctionProcess] = []
    try:
        url = bouncer.url(urlsplit(database_url).path.strip("/"))
        procs = [FunctionProcess("intake", {**base_env, "DATABASE_URL": url}, threads=THREADS).start() for _ in range(SCALE_PROCESSES)]
        burst = SCALE_CONNECTIONS * 10
        per_process = burst // SCALE_PROCESSES
        with concurrent.futures.ThreadPoolExecutor(SCALE_PROCESSES) as pool:
            runs = list(pool.map(lambda p: wrk(p.url + "/webhook/alert", per_process), procs))
        probe = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
        with probe.connect() as conn:
            # PgBouncer's server connections carry the clients' application_name.
            servers = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND application_name = 'incident-response' AND pid <> pg_backend_pid()")).scalar()
        probe.dispose()
        process_logs = "".join(p.logs() for p in procs)
    finally:
        for proc in procs:
            proc.stop()
        bouncer.stop()
    total_rps = sum(r["rps"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    rows = ["## 9. Scale-out through PgBouncer", "",
            f"{SCALE_PROCESSES} intake processes (THREADS={THREADS}, each its own pool of DB_POOL_SIZE 4 + DB_MAX_OVERFLOW 4) "
            f"through one PgBouncer in transaction pooling mode with `default_pool_size = {SCALE_POOL}`, hit by a 10x burst: "
            f"{burst} wrk connections ({per_process} per process, {WRK_SECONDS:g} s), one new AlertManager alert per webhook. "
            f"Baseline: one intake process straight to PostgreSQL at {SCALE_CONNECTIONS} connections, same run.", "",
            "| Case | connections | req/s | p50 ms | p99 ms | max ms | errors | ÷ one process |", "|---|---|---|---|---|---|---|---|",
            f"| one process, direct | {SCALE_CONNECTIONS} | {one['rps']:.0f} | {one['p50']:.1f} | {one['p99']:.1f} | {one['max']:.0f} | "
            f"{one['errors']} | 1.00 |",
            f"| {SCALE_PROCESSES} processes via PgBouncer | {burst} | {total_rps:.0f} | {statistics.median(r['p50'] for r in runs):.1f} | "
            f"{max(r['p99'] for r in runs):.1f} | {max(r['max'] for r in runs):.0f} | {errors} | {total_rps / one['rps']:.2f} |",
            "",
            f"Server connections PostgreSQL saw from PgBouncer at the end: {servers} (pool {SCALE_POOL}; the {SCALE_PROCESSES} processes "
            f"held up to {SCALE_PROCESSES * 8} client connections). Tracebacks in the processes' logs: {process_logs.count('Traceback')}.", ""]
    return rows


LIST_ROWS = int(os.environ.get("BENCH_LIST_ROWS", "1000000"))
LIST_REQUESTS = int(os.environ.get("BENCH_LIST_REQUESTS", "60"))


def incident_list(server: str) -> list[str]:
    """GET /incidents at a million incidents, through the query function:
    first pages with each filter and keyset pages deep into the list, p50/p99
    over repeated requests; the same requests once more without the list
    indexes of migration 0014, as the in-run baseline."""
    name = f"ir_bench_list_{uuid.uuid4().hex[:8]}"
    db.run_outside_transaction(with_db(server, "postgres"), f'CREATE DATABASE "{name}"')
    url = with_db(server, name)
    try:
        migrate.upgrade(url)
        # A generous socket timeout: one seeding statement writes 100,000 rows.
        engine = db.create_engine_for(url, pool_size=1, max_overflow=0, timeout=900)
        started = time.monotonic()
        step = 100_000
        for first in range(1, LIST_ROWS + 1, step):
            with engine.begin() as conn:
                conn.execute(sa.text(LIST_SEED), {"a": first, "b": min(LIST_ROWS, first + step - 1)})
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE incidents")
        seeded = time.monotonic() - started
        query = FunctionProcess("query", {"DATABASE_URL": url, "INCIDENT_API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"}, threads=4).start()
        try:
            with_indexes = _list_cases(query.url)
            sql_with = _sql_cases(engine)
            index_names = ("idx_incidents_status_created", "idx_incidents_priority_created", "idx_incidents_alert_name_created")
            with engine.begin() as conn:
                definitions = {n: conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"), {"n": n}).scalar()
                               for n in index_names}
                for n in index_names:
                    conn.exec_driver_sql(f"DROP INDEX {n}")
            without = _list_cases(query.url)
            sql_without = _sql_cases(engine)
            with engine.begin() as conn:
                for definition in definitions.values():
                    conn.exec_driver_sql(definition)
        finally:
            query.stop()
        engine.dispose()
    finally:
        db.run_outside_transaction(with_db(server, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    rows = ["## 10. The incident list at a million incidents", "",
            f"{LIST_ROWS:,} incidents over a year (1 % open, 1 % investigating, the rest resolved or closed; 200 alert names, 50 services; "
            f"seeded in {seeded:.0f} s), `GET /incidents` through the query function, {LIST_REQUESTS} requests per case, 50 per page. "
            "Baseline: the same requests in the same run without the list indexes of migration 0014 "
            "(status, priority, alert name each followed by created_at DESC, id DESC).", "",
            "HTTP: the whole request through the query function; SQL: `list_incidents` alone (the page's query and its rows), "
            "in this process; rows read: the incidents rows PostgreSQL read for the page (20 pages for the cursor cases), from its "
            "own per-transaction counters, which the machine's load does not change.", "",
            "| Request | HTTP p50 ms | HTTP p99 ms | SQL p50 ms | SQL p99 ms | rows read | without 0014: HTTP p99 ms | SQL p99 ms | rows read |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label in with_indexes:
        a, b = with_indexes[label], without[label]
        c, d = sql_with.get(label, []), sql_without.get(label, [])
        rows.append(f"| {label} | {pct(a, 50):.1f} | {pct(a, 99):.1f} | {pct(c, 50):.1f} | {pct(c, 99):.1f} | {sql_with['rows:' + label]:,} | "
                    f"{pct(b, 99):.1f} | {pct(d, 99):.1f} | {sql_without['rows:' + label]:,} |")
    rows.append("")
    return rows


# Deterministic rows a..b: created every 30 s back from now, so 1M rows span 347 days.
LIST_SEED = """
INSERT INTO incidents (id, alert_name, priority, status, created_at, updated_at, resolved_at, summary, fingerprint, labels, source)
SELECT md5('bench' || g)::uuid::text, 'Alert' || (mod(g, 200)), (ARRAY['P0','P1','P2'])[1 + mod(g, 3)]::incident_priority,
       (CASE WHEN mod(g, 100) = 0 THEN 'open' WHEN mod(g, 100) = 1 THEN 'investigating' WHEN mod(g, 2) = 0 THEN 'resolved' ELSE 'closed' END)::incident_status,
       t.at, t.at, CASE WHEN mod(g, 100) > 1 THEN t.at + interval '1 hour' END, 'bench incident', 'bench-' || g,
       jsonb_build_object('service', 'svc-' || (mod(g, 50)), 'severity', 'critical'), 'alertmanager'
FROM generate_series(CAST(:a AS int), CAST(:b AS int)) AS g, LATERAL (SELECT timezone('utc', now()) - g * interval '30 seconds') AS t(at)
"""

LIST_CASES = {
    "no filter, first page": "",
    "status=open": "status=open",
    "status=investigating,open": "status=investigating,open",
    "priority=P0": "priority=P0",
    "alert_name=Alert7": "alert_name=Alert7",
    "status=open&priority=P0": "status=open&priority=P0",
    "service=svc-7": "service=svc-7",
    "since=7 days ago": "since=" + "{since}",
}


def _list_cases(base: str) -> dict[str, list[float]]:
    http = requests.Session()
    http.headers.update(AUTH)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7 * 86400))
    results: dict[str, list[float]] = {}

    def timed(url: str) -> requests.Response:
        start = time.perf_counter()
        response = http.get(url, timeout=60)
        elapsed = (time.perf_counter() - start) * 1000
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        return response, elapsed

    for label, params in LIST_CASES.items():
        url = f"{base}/incidents?limit=50&{params.format(since=since)}"
        timed(url)  # warm
        results[label] = [timed(url)[1] for _ in range(LIST_REQUESTS)]
    # Keyset pages: follow the Link header 20 pages deep, and time each page.
    for label, params in (("status=resolved, pages 1-20 by cursor", "status=resolved"), ("alert_name=Alert7, pages 1-20 by cursor", "alert_name=Alert7")):
        samples = []
        for _ in range(max(1, LIST_REQUESTS // 20)):
            url = f"{base}/incidents?limit=50&{params}"
            for _ in range(20):
                response, elapsed = timed(url)
                samples.append(elapsed)
                link = response.headers.get("Link", "")
                if not link:
                    break
                url = link[link.index("<") + 1:link.index(">")]
        results[label] = samples
    return results


TUPLES_READ = sa.text("SELECT COALESCE(sum(seq_tup_read + COALESCE(idx_tup_fetch, 0)), 0) FROM pg_stat_xact_user_tables "
                      "WHERE relname = 'incidents'")


def _tuples_read(conn, flt, after=None, pages: int = 1) -> int:
    """Rows of ``incidents`` PostgreSQL read for ``pages`` pages: its own
    counters for this transaction, so the figure does not depend on the
    machine's load."""
    from shared import incident_queries

    conn.rollback()
    # The view also shows what earlier transactions read and the backend
    # has not reported yet: the difference is this page's.
    before = conn.execute(TUPLES_READ).scalar()
    for _ in range(pages):
        _, after = incident_queries.list_incidents(conn, flt, 50, after)
        if after is None:
            break
    read = conn.execute(TUPLES_READ).scalar() - before
    conn.rollback()
    return int(read)


def _sql_cases(engine) -> dict[str, list[float]]:
    from werkzeug.datastructures import MultiDict

    from shared import filters, incident_queries

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7 * 86400))
    results: dict[str, list[float]] = {}
    with engine.connect() as conn:
        for label, params in LIST_CASES.items():
            flt = filters.parse(MultiDict([tuple(p.split("=", 1)) for p in params.format(since=since).split("&") if p]))
            incident_queries.list_incidents(conn, flt, 50)
            samples = []
            for _ in range(LIST_REQUESTS):
                start = time.perf_counter()
                incident_queries.list_incidents(conn, flt, 50)
                samples.append((time.perf_counter() - start) * 1000)
            results[label] = samples
            results["rows:" + label] = _tuples_read(conn, flt)
        for label, params in (("status=resolved, pages 1-20 by cursor", "status=resolved"), ("alert_name=Alert7, pages 1-20 by cursor", "alert_name=Alert7")):
            flt = filters.parse(MultiDict([tuple(params.split("=", 1))]))
            samples = []
            for _ in range(max(1, LIST_REQUESTS // 20)):
                after = None
                for _ in range(20):
                    start = time.perf_counter()
                    _, after = incident_queries.list_incidents(conn, flt, 50, after)
                    samples.append((time.perf_counter() - start) * 1000)
                    if after is None:
                        break
            results[label] = samples
            results["rows:" + label] = _tuples_read(conn, flt, pages=20)
        conn.rollback()
    return results


def _tree(pid: int) -> list[int]:
    return [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def _kb(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_of(pid: int) -> tuple[float, float]:
    """RSS and PSS of a process tree (a function's one process; the bare
    function's gunicorn master and worker), MB. RSS counts a page a forked
    worker shares with its master in both; PSS splits it between them, so the PSS sum is what the instance
    takes from the machine. Both are reported."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            rss += _kb(f"/proc/{p}/status", "VmRSS")
            pss += _kb(f"/proc/{p}/smaps_rollup", "Pss")
        except OSError:
            pass
    return rss / 1024, pss / 1024


def cpu_ms_of(pid: int) -> float:
    """CPU time (user + system) the process tree has used, ms."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total * 1000 / ticks


COLD_ROUNDS = 5


def _first_request(name: str, base: str) -> requests.Response:
    """Each function's first real request: what Knative's activator holds
    until the readiness probe (/health) passes, and then forwards. An event
    of an incident that does not exist still builds the handler, imports
    SQLAlchemy and asks the database, as any first event does."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    if name == "bare":
        return requests.get(base + "/", timeout=30)
    if name == "intake":
        return requests.post(base + "/webhook/alert", data=webhook([alert("ColdStart", instance=uuid.uuid4().hex)]),
                             headers=AUTH, timeout=30)
    if name == "query":
        return requests.get(base + "/incidents?limit=1", headers=auth, timeout=30)
    event_type = {"diagnostics": "opened", "remediation": "diagnosed", "escalation": "opened", "deadletter": "opened"}[name]
    incident = str(uuid.uuid4())
    headers = {**auth, "Content-Type": "application/json", "ce-specversion": "1.0", "ce-id": f"{incident}.{event_type}.0",
               "ce-type": f"io.incidentresponse.incident.{event_type}", "ce-source": "/bench", "ce-subject": incident,
               "ce-incidentid": incident}
    return requests.post(base + "/", data=json.dumps({"incident_id": incident}), headers=headers, timeout=30)


def cold_starts(database_url: str) -> tuple[list[str], float]:
    def measure(name: str, source: Path, target: str, env: dict) -> tuple[float, float, float]:
        """(ms to /health's first 2xx, CPU ms then, ms to the first real request's answer)."""
        port = free_port()
        start = time.perf_counter()
        # The bare function as functions-framework serves it (gunicorn); the
        # functions as the image does (shared/serve.py).
        command = ([str(VENV_BIN / "functions-framework"), "--source", str(source), "--target", target, "--port", str(port),
                    "--host", "127.0.0.1"] if name == "bare" else [sys.executable, "-m", "shared.serve"])
        proc = subprocess.Popen(command, env={**os.environ, **env, "PYTHONPATH": str(ROOT), "FUNCTION_SOURCE": str(source),
                                              "FUNCTION_TARGET": target, "HOST": "127.0.0.1", "PORT": str(port)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    # A long read timeout: the first request imports the handlers.
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code < 300:
                        ready, cpu = (time.perf_counter() - start) * 1000, cpu_ms_of(proc.pid)
                        answered = _first_request(name, f"http://127.0.0.1:{port}")
                        served = (time.perf_counter() - start) * 1000 if answered.status_code < 500 else float("nan")
                        return ready, cpu, served
                except requests.ConnectionError:
                    time.sleep(0.005)
                if time.perf_counter() - start > 30:
                    return float("nan"), float("nan"), float("nan")
        finally:
            proc.terminate()
            proc.wait()

    env = {"DATABASE_URL": database_url, "INCIDENT_API_TOKEN": TOKEN}
    names = ("intake", "query", "diagnostics", "remediation", "escalation", "deadletter")
    # Round by round (the bare function, then each function): on a shared
    # machine the load drifts, and a round keeps every start of it under
    # the same conditions as its own baseline.
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ("bare", *names)}
    for _ in range(COLD_ROUNDS):
        samples["bare"].append(measure("bare", ROOT / "bench" / "bare" / "main.py", "bare", {}))
        for name in names:
            samples[name].append(measure(name, ROOT / "functions" / name / "main.py", name, env))

    def median(name: str, index: int) -> float:
        return statistics.median(s[index] for s in samples[name])

    def ratio(name: str, index: int) -> float:
        # The median of the per-round ratios: each start against the bare start of its own round.
        return statistics.median(s[index] / b[index] for s, b in zip(samples[name], samples["bare"], strict=True))

    bare = median("bare", 0)
    rows = ["## 5. Cold start", "", "Process start to the first `2xx` from `/health` (the readiness probe; it also opens the first database "
            f"connection), and to the answer of the first real request right after it, {COLD_ROUNDS} rounds, each starting the bare "
            "functions-framework `http` function (bench/bare, as `functions-framework --target` serves it: gunicorn's master and one "
            "worker) and then every function (as the image serves it: shared/serve.py, one process); medians, and the median of each round's ratio to "
            "its bare start. The first real request is what Knative's activator holds until the probe passes: a one-alert webhook for "
            "the intake, `GET /incidents?limit=1` for the query, an event for the others (of an incident that does not exist, which "
            "still builds the handler and asks the database), `GET /` for the bare function. Imports deferred past `/health` are paid "
            "there. CPU ms: user + system time of the process tree at the `/health` answer, which other work on the "
            "machine changes less than the wall time. The sources are byte-compiled first, as in the image.", "",
            "| Function | /health ms | ÷ bare | CPU ms | CPU ÷ bare | first request answered ms | ÷ bare |", "|---|---|---|---|---|---|---|",
            f"| bare function | {bare:.0f} | 1.00 | {median('bare', 1):.0f} | 1.00 | {median('bare', 2):.0f} | 1.00 |"]
    for name in names:
        rows.append(f"| {name} | {median(name, 0):.0f} | {ratio(name, 0):.2f} | {median(name, 1):.0f} | {ratio(name, 1):.2f} "
                    f"| {median(name, 2):.0f} | {ratio(name, 2):.2f} |")
    rows.append("")
    return rows, bare


def bare_memory() -> tuple[float, float]:
    port = free_port()
    popen = subprocess.Popen([str(VENV_BIN / "functions-framework"), "--source", str(ROOT / "bench" / "bare" / "main.py"), "--target", "bare",
                              "--port", str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=1).ok, 30, message="bare function")
        return memory_of(popen.pid)
    finally:
        popen.terminate()
        popen.wait()


CORRELATION_SECONDS = float(os.environ.get("BENCH_CORRELATION_SECONDS", "4"))
CORRELATION_ROUNDS = int(os.environ.get("BENCH_CORRELATION_ROUNDS", "5"))


def correlation(engine, database_url: str) -> list[str]:
    """The labelled storms of tests/storms.py (kube-prometheus alerts, the
    loopback Kubernetes API as the cluster) through correlation, scored by
    pairwise precision and recall; then single-alert intake throughput with
    the shipped rules against correlation switched off, in the same run."""
    from shared.config import load_settings
    from tests import storms

    config = load_settings({"DATABASE_URL": database_url})
    kube = FakeKubernetes().start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = kube.kubeconfig(Path(tmp))
            for scenario in storms.SCENARIOS:
                with engine.begin() as conn:
                    conn.execute(sa.text("TRUNCATE incident_members, incident_timeline, event_outbox, incidents CASCADE"))
                steps = storms.prepare(scenario, kube)
                storms.feed(engine, storms.correlator_for(scenario, kubeconfig), steps, config)
                rows.append((scenario, storms.score(steps, storms.grouping(engine, steps))))
    finally:
        kube.stop()
    total = storms.overall(rows)
    alerts, opened = sum(s.alerts for _, s in rows), sum(s.incidents for _, s in rows)
    return ["## 8. Correlation", "",
            "Labelled storms (tests/storms.py) scored over alert pairs: precision = pairs grouped that belong together / pairs grouped; "
            f"recall = pairs grouped / pairs that belong together. Across all: precision {total.precision:.3f}, recall {total.recall:.3f}; "
            f"{alerts} alerts became {opened} incidents ({alerts / opened:.1f} alerts per incident).", "",
            *storms.table(rows), "", *correlation_cost(database_url)]


def correlation_cost(database_url: str) -> list[str]:
    """Single-alert intake with the shipped rules ÷ with an empty rules file
    (correlation off). Both intake processes are loaded **at the same
    time**, each by its own clients, so both meet the same machine load (it
    drifts a lot here, from one second to the next); each round's ratio is
    on ÷ off, and the median round is the figure. Two kinds of alert: one no
    rule concerns (the common path), and a kube-prometheus pod alert with a
    `node` label, which the node rule concerns (advisory locks sent with the
    upsert, the upsert's look-up of an incident offering its node, a member
    row; no topology source is configured, so no Kubernetes call is in the
    figure)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "no-rules.yaml"
        empty.write_text("rules: []\n")
        env = {"DATABASE_URL": database_url, "INCIDENT_API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING",
               "PROMETHEUS_URL": "", "KUBECONFIG": str(Path(tmp) / "none")}
        servers = {"on": FunctionProcess("intake", env, threads=THREADS).start(),
                   "off": FunctionProcess("intake", {**env, "CORRELATION_FILE": str(empty)}, threads=THREADS).start()}
        run = uuid.uuid4().hex[:6]
        kinds = {
            "alert no rule concerns": lambda i, by: webhook([alert("BenchPlain", run=run, by=by, i=str(i))]),
            "pod alert (node rule)": lambda i, by: webhook([alert(
                "KubePodNotReady", run=run, by=by, namespace="bench", pod=f"web-{by}-{i}", node=f"ip-10-9-{i % 50}-1")]),
        }
        results: dict[str, list[tuple[dict, dict]]] = {}

        async def both(body, n: int) -> tuple[dict, dict]:
            on, off = await asyncio.gather(*(
                _load(servers[label].url + "/webhook/alert", lambda i, x=f"{label}{n}": body(i, x), CORRELATION_SECONDS, CONCURRENCY)
                for label in ("on", "off")))
            return on, off

        try:
            for n in range(CORRELATION_ROUNDS):
                for kind, body in kinds.items():
                    results.setdefault(kind, []).append(asyncio.run(both(body, n)))
        finally:
            for server in servers.values():
                server.stop()
    rows = ["### Single-alert intake: correlation on ÷ off", "",
            f"Both intakes loaded at once (concurrency {CONCURRENCY} each, one new alert per webhook), {CORRELATION_ROUNDS} rounds "
            f"of {CORRELATION_SECONDS:g} s per kind of alert; the round with the median on ÷ off is shown. The same process "
            "settings as section 1; \"off\" is CORRELATION_FILE with `rules: []`. No topology source is configured: Kubernetes lookups are "
            "not in the figure.", "",
            "| Alert | shipped rules req/s | p99 ms | correlation off req/s | p99 ms | errors | on ÷ off (median round) |",
            "|---|---|---|---|---|---|---|"]
    for kind, pairs in results.items():
        on, off = sorted(pairs, key=lambda p: p[0]["rps"] / p[1]["rps"])[len(pairs) // 2]
        errors = sum(r["errors"] for pair in pairs for r in pair)
        rows.append(f"| {kind} | {on['rps']:.0f} | {on['p99']:.1f} | {off['rps']:.0f} | {off['p99']:.1f} | {errors} | "
                    f"{on['rps'] / off['rps']:.2f} |")
    rows += ["", "Every round, on ÷ off: " + "; ".join(
        f"{kind}: " + ", ".join(f"{on['rps']:.0f}/{off['rps']:.0f} = {on['rps'] / off['rps']:.2f}" for on, off in pairs)
        for kind, pairs in results.items()), ""]
    return rows


def fresh_tables(engine) -> None:
    """Empty the tables between sections: the throughput sections leave tens
    of thousands of open P0 incidents whose events were never published (no
    Broker then), which the pipeline's publisher would otherwise send first."""
    with engine.begin() as conn:
        tables = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                      "AND tablename <> 'alembic_version'")).scalars().all()
        conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")


def compile_sources() -> None:
    """Byte-compile the functions' sources, as the image does (Dockerfile:
    ``compileall``). Without it a function started here under
    ``PYTHONDONTWRITEBYTECODE`` compiles every module of shared/ and
    functions/ from source at each start, a cost no deployed instance pays
    and the bare function (one small file) barely has."""
    import compileall

    for folder in ("shared", "functions", "bench/bare"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)


def main() -> None:
    from shared import log as logs

    logs.configure("WARNING")
    compile_sources()
    server = server_url()
    name = f"ir_bench_{uuid.uuid4().hex[:8]}"
    db.run_outside_transaction(with_db(server, "postgres"), f'CREATE DATABASE "{name}"')
    database_url = with_db(server, name)
    started = time.monotonic()
    try:
        migrate.upgrade(database_url)
        engine = db.create_engine_for(database_url, pool_size=2, max_overflow=2)
        with tempfile.TemporaryDirectory() as tmp:
            report = [
                "# Benchmarks",
                "",
                f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                f"PostgreSQL {engine.connect().execute(sa.text('SHOW server_version')).scalar()}. The machine is shared, so compare "
                "the ratios to the baselines of the same run, not the absolute numbers across runs. "
                f"Load average when the run started (other work on the machine): {' '.join(f'{x:.1f}' for x in os.getloadavg())}.",
                "",
            ]
            only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
            if not only or "throughput" in only:
                report += throughput(database_url, engine)
            if not only or "storm" in only:
                report += storm(database_url)
            rss = {}
            fresh_tables(engine)
            if not only or "pipeline" in only:
                pipeline_rows, rss = pipeline(database_url, engine, Path(tmp))
                report += pipeline_rows
            fresh_tables(engine)
            if not only or "storm-pipeline" in only:
                report += storm_to_pages(database_url, engine, Path(tmp))
            if not only or "cold" in only:
                cold, _ = cold_starts(database_url)
                report += cold
            bare, bare_pss = bare_memory()
            report += ["## 6. Resident memory", "", "After the pipeline run, each function's process (shared/serve.py: one process per instance); baseline: the "
                       "bare function as functions-framework serves it, gunicorn's master and one worker, after its first request. RSS sums "
                       "the processes' resident pages, counting the pages the forked worker shares with its master twice; PSS counts each "
                       "page once, split between the processes that map it (`/proc/PID/smaps_rollup`).", "",
                       "| Function | RSS MB | ÷ bare | PSS MB | ÷ bare |", "|---|---|---|---|---|",
                       f"| bare function | {bare:.0f} | 1.00 | {bare_pss:.0f} | 1.00 |"]
            report += [f"| {n} | {r:.0f} | {r / bare:.2f} | {p:.0f} | {p / bare_pss:.2f} |" for n, (r, p) in rss.items()]
            report.append("")
            if not only or "diagnosis" in only:
                report += diagnosis_section()
            if not only or "correlation" in only:
                report += correlation(engine, database_url)
            if not only or "scaleout" in only:
                report += scale_out(database_url)
            if not only or "list" in only:
                report += incident_list(server)
            report += ["", f"Whole run: {time.monotonic() - started:.0f} s.", ""]
        engine.dispose()
    finally:
        db.run_outside_transaction(with_db(server, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    text = "\n".join(report)
    print(text)
    if not os.environ.get("BENCH_ONLY"):
        path = ROOT / "docs" / "benchmarks.md"
        # The image section is measured by hand (docs/deploy.md): keep it.
        previous = path.read_text() if path.exists() else ""
        kept = previous[previous.index(IMAGE_SECTION):] if IMAGE_SECTION in previous else ""
        path.write_text(text + ("\n" + kept if kept else ""))


IMAGE_SECTION = "## Image size"


if __name__ == "__main__":
    main()
