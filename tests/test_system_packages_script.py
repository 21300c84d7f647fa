"""scripts/ensure-system-packages.sh fails loudly: an installation that fails
or leaves a binary missing is an error, and so is a missing package under
CI=true without root. apt-get and id are stand-ins on a private PATH, so
nothing is installed and no system file is touched."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from loopback.processes import ROOT

SCRIPT = ROOT / "scripts" / "ensure-system-packages.sh"
TOOLS = ("sort", "tr", "ls", "chmod", "rm", "cat")


@pytest.fixture
def bin_dir(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), path / tool)
    return path


def stub(bin_dir, name, body):
    script = bin_dir / name
    script.write_text("#!" + shutil.which("bash") + "\n" + body + "\n")
    script.chmod(0o755)


def run(bin_dir, tmp_path, uid="0", apt_status=0, ci=None):
    stub(bin_dir, "id", f"echo {uid}")
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {tmp_path}/apt.log; [ "$1" = update ] && exit 0; exit {apt_status}')
    env = {"PATH": str(bin_dir), "POLICY_RC_D": str(tmp_path / "policy-rc.d"), "TEST_DATABASE_URL": "postgresql://x@127.0.0.1/x"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_a_failed_installation_exits_non_zero(bin_dir, tmp_path):
    result = run(bin_dir, tmp_path, apt_status=100)
    assert result.returncode != 0 and "ERROR" in result.stderr and "chromium" in result.stderr
    assert "install" in (tmp_path / "apt.log").read_text()
    assert not (tmp_path / "policy-rc.d").exists()


def test_an_installation_that_leaves_a_binary_missing_exits_non_zero(bin_dir, tmp_path):
    result = run(bin_dir, tmp_path, apt_status=0)
    assert result.returncode != 0 and "still missing" in result.stderr


def test_without_root_a_missing_package_fails_under_ci_and_warns_elsewhere(bin_dir, tmp_path):
    strict = run(bin_dir, tmp_path, uid="1000", ci="true")
    assert strict.returncode == 1 and "CI=true" in strict.stderr
    lenient = run(bin_dir, tmp_path, uid="1000")
    assert lenient.returncode == 0 and "WARNING" in lenient.stderr
    assert not (tmp_path / "apt.log").exists()


def test_nothing_missing_is_success(bin_dir, tmp_path):
    for name in ("prometheus-alertmanager", "amtool", "prometheus", "promtool", "chromium", "chromedriver",
                 "podman", "runc", "mmdebstrap", "pgbouncer", "wrk"):
        stub(bin_dir, name, "exit 0")
    result = run(bin_dir, tmp_path, ci="true")
    assert result.returncode == 0 and result.stderr == ""
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("docker_info, wanted", [
    ("exit 0", set()),                                   # a docker daemon answers: it builds and runs the image
    ("exit 1", {"podman", "runc", "mmdebstrap"}),        # a docker client alone runs nothing
    (None, {"podman", "runc", "mmdebstrap"}),
])
def test_a_container_tool_is_installed_unless_docker_works(bin_dir, tmp_path, docker_info, wanted):
    for name in ("prometheus-alertmanager", "amtool", "prometheus", "promtool", "chromium", "chromedriver", "pgbouncer", "wrk"):
        stub(bin_dir, name, "exit 0")
    if docker_info is not None:
        stub(bin_dir, "docker", docker_info)
    result = run(bin_dir, tmp_path, apt_status=0)
    asked = set((tmp_path / "apt.log").read_text().split("install -y -qq --no-install-recommends")[1].split()) if wanted else set()
    assert asked == wanted, result.stderr
