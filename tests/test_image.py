"""The image, built and run as Knative runs it.

`make image`'s script builds the Dockerfile (from a Debian base built here
when no registry is reachable, see tests/container.py), then the containers
run read-only, as uid 10001, with every capability dropped and no new
privileges, on the host's network against the test PostgreSQL:

- the migration Job's own command migrates a fresh database;
- intake and query start with the environment the generated Knative
  Services give them (their secrets mounted as files at the same paths)
  and answer /health;
- an AlertManager webhook posted to the intake is read back through query;
- neither logs an ERROR or a traceback while doing it.

It skips, saying why, only when nothing here can run containers.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import requests
import yaml

from deploy import manifests
from loopback.processes import free_port, wait_until
from shared import db as db_module
from tests import container
from tests.conftest import TEST_TOKEN, _server_url, _with_database
from tests.factories import raw_alert, webhook

IMAGE = "localhost/incident-response:test"
HARDENED = ["--read-only", "--user", "10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--network", "host", "--tmpfs", "/tmp:rw,size=16m,mode=1777"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="session")
def engine():
    try:
        return container.engine()
    except container.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def image(engine):
    """Built once per session through scripts/build-image.sh; the engine's
    layer cache makes a rebuild of unchanged sources take seconds."""
    import subprocess

    env = {**os.environ, "IMAGE": IMAGE, "BASE_IMAGE": container.base_image(engine), "CONTAINER_TOOL": engine.tool,
           # The build's pip reaches the index through the host's network
           # and trusts what the host trusts (a build secret, not kept).
           "BUILD_NETWORK": "host", "CA_BUNDLE": CA_BUNDLE if os.path.exists(CA_BUNDLE) else ""}
    before = engine("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    result = subprocess.run(["scripts/build-image.sh"], cwd=manifests.ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    after = engine("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if before and before != after:
        # The previous test image (not its cached layers): one per change would pile up.
        engine("rmi", before, check=False)
    size = int(engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"\nimage {IMAGE} on {env['BASE_IMAGE']}: {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def fresh_database():
    """A database no migration has touched: the container migrates it."""
    server = _server_url()
    name = f"ir_image_{uuid.uuid4().hex[:10]}"
    admin = _with_database(server, "postgres")
    db_module.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    yield _with_database(server, name)
    db_module.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def secrets(tmp_path_factory, fresh_database):
    """The Secrets as Knative mounts them: one file per key, under the paths the manifests name."""
    root = tmp_path_factory.mktemp("secrets")
    mounts = {}
    for secret, value in {"incident-db": fresh_database, "incident-api-token": TEST_TOKEN}.items():
        key = manifests.SECRET_MOUNTS[secret][0]
        folder = root / secret
        folder.mkdir()
        (folder / key).write_text(value)
        os.chmod(folder, 0o755)
        os.chmod(folder / key, 0o644)  # uid 10001 reads it, as the kubelet's projection allows
        mounts[secret] = folder
    return mounts


def mount_flags(secrets: dict) -> list[str]:
    return [flag for secret, folder in secrets.items()
            for flag in ("-v", f"{folder}:{manifests.SECRETS}/{secret}:ro")]


def config_mount_flags(name: str) -> list[str]:
    """The ConfigMaps the service mounts (the correlation rules, for one), as
    files from what kustomize generates them from, at the manifest's paths."""
    kustomization = yaml.safe_load((manifests.BASE / "kustomization.yaml").read_text())
    generated = {g["name"]: g.get("files", []) for g in kustomization["configMapGenerator"]}
    spec = manifests.service(name)["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
    flags = []
    for mount in spec["containers"][0].get("volumeMounts", []):
        for entry in generated.get(volumes.get(mount["name"]), []):
            key, _, source = entry.rpartition("=") if "=" in entry else (None, "", entry)
            path = manifests.BASE / source
            flags += ["-v", f"{path}:{mount['mountPath']}/{key or path.name}:ro"]
    return flags


def config_env() -> dict[str, str]:
    kustomization = yaml.safe_load((manifests.BASE / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "incident-response-config"]
    env = dict(literal.split("=", 1) for literal in generator["literals"])
    env.pop("PROMETHEUS_URL")  # nothing to ask here; diagnostics is not started
    return env


def service_env(name: str) -> dict[str, str]:
    (container_spec,) = manifests.service(name)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container_spec["env"]}


@pytest.fixture(scope="module")
def running(engine, image, secrets, broker):
    # The migration Job's command, as the Job runs it.
    job = yaml.safe_load((manifests.BASE / "migrate-job.yaml").read_text())
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in migrate["env"]}
    env_flags = [flag for k, v in env.items() for flag in ("-e", f"{k}={v}")]
    result = engine("run", "--rm", *engine.run_flags(), *HARDENED, *mount_flags(secrets), *env_flags, image,
                    *migrate["command"], check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {}
    for name in ("intake", "query"):
        port = free_port()
        env = {**config_env(), **service_env(name), "PORT": str(port), "K_SINK": broker.url + "/default/incidents"}
        env_flags = [flag for k, v in env.items() for flag in ("-e", f"{k}={v}")]
        container_name = f"ir-test-{name}-{uuid.uuid4().hex[:8]}"
        engine("run", "-d", "--name", container_name, *engine.run_flags(), *HARDENED, *mount_flags(secrets),
               *config_mount_flags(name), *env_flags, image)
        names[name] = (container_name, f"http://127.0.0.1:{port}")
    yield {"migrate": result, **names}
    for container_name, _ in names.values():
        engine("rm", "-f", container_name, check=False)


def healthy(url: str):
    try:
        response = requests.get(url + "/health", timeout=2)
    except requests.RequestException:
        return None
    return response if response.status_code == 200 else None


def test_the_containers_migrate_serve_store_and_answer(engine, running, fresh_database):
    assert "Traceback" not in running["migrate"].stdout + running["migrate"].stderr
    import sqlalchemy as sa

    migrated = db_module.create_engine_for(fresh_database, pool_size=1, max_overflow=0)
    try:
        with migrated.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        migrated.dispose()

    for name in ("intake", "query"):
        container_name, url = running[name]
        response = wait_until(lambda url=url: healthy(url), timeout=60, message=f"{name} /health")
        assert response.json() == {"status": "healthy", "database": "connected"}

    auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
    marker = f"ImageTest{uuid.uuid4().hex[:8]}"
    body = webhook([raw_alert(marker, severity="critical", service="email")])
    stored = requests.post(running["intake"][1] + "/webhook/alert", data=json.dumps(body),
                           headers={**auth, "Content-Type": "application/json"}, timeout=30)
    assert stored.status_code in (200, 201, 202), stored.text
    listed = requests.get(running["query"][1] + "/incidents", headers=auth, timeout=30)
    assert listed.status_code == 200, listed.text
    mine = [i for i in listed.json() if marker in json.dumps(i)]
    assert len(mine) == 1, listed.text

    for name in ("intake", "query"):
        logs = engine("logs", running[name][0])
        text = logs.stdout + logs.stderr
        for bad in ("ERROR", "Traceback", "Permission denied"):
            assert bad not in text, f"{name} logged {bad}:\n{text[-3000:]}"


def test_the_image_runs_as_uid_10001_with_compiled_sources_and_no_dev_packages(engine, image):
    user = engine("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user == "10001"
    probe = ("import importlib.util as u; import shared.http; "
             "missing=[m for m in ('pytest','selenium','kubernetes_validate','ruff','pip') if u.find_spec(m)]; "
             "print(sorted(missing)); print(u.cache_from_source('/app/functions/intake/main.py'))")
    result = engine("run", "--rm", *engine.run_flags(), *HARDENED, "-e", "PYTHONDONTWRITEBYTECODE=1", image,
                    "python", "-c", probe, check=False)
    assert result.returncode == 0, result.stderr
    missing_line, cached = result.stdout.strip().splitlines()[-2:]
    assert missing_line == "[]", f"test or build tools in the runtime image: {missing_line}"
    # The .pyc exists in the image (read-only /app: compiled at build time or never).
    check = engine("run", "--rm", *engine.run_flags(), *HARDENED, image, "test", "-f", cached, check=False)
    assert check.returncode == 0, f"{cached} is not in the image"
    # The CA bundle the build was given (a build secret) stayed out of it.
    if os.path.exists(CA_BUNDLE):
        leftover = engine("run", "--rm", *engine.run_flags(), *HARDENED, image, "sh", "-c",
                          "ls /run/secrets/ca /build 2>/dev/null; env | grep -i PIP_CERT", check=False)
        assert leftover.stdout.strip() == "", leftover.stdout


def test_without_function_variables_the_container_says_which_are_missing(engine, image):
    result = engine("run", "--rm", *engine.run_flags(), *HARDENED, image, check=False, timeout=120)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "FUNCTION_SOURCE" in lines[0] and "FUNCTION_TARGET" in lines[0], lines
