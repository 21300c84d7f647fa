"""A container tool that can really run containers here, and a base image
for the Dockerfile that needs no registry.

The engine: ``CONTAINER_TOOL`` if set, else docker when its daemon answers,
else podman (Debian's, with runc; `make test` installs it). Podman's default
ulimits can exceed what an unprivileged or nested host allows (runc then
fails with "error setting rlimits"), so containers get limits within the
host's.

The base: ``BASE_IMAGE`` if set, else the Dockerfile's default when the
engine already has it, else a Debian bookworm root file system built with
mmdebstrap from Debian packages (python3, venv) and imported as an image.
It is tagged with a hash of its recipe, so a later run finds it and the
suite stays fast.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass

DEFAULT_BASE = "python:3.11.10-slim-bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
MMDEBSTRAP = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
              "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
              "--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm", "-"]


class Unavailable(Exception):
    """Nothing here can run containers; the message says why."""


def _ok(*argv: str, timeout: float = 60) -> bool:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass(frozen=True)
class Engine:
    tool: str

    def run_flags(self) -> list[str]:
        if self.tool != "podman":
            return []
        flags = []
        for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
            soft, hard = resource.getrlimit(limit)
            value = min(v for v in (soft, hard, 4096) if v != resource.RLIM_INFINITY)
            flags += ["--ulimit", f"{name}={value}:{value}"]
        return flags

    def has_image(self, image: str) -> bool:
        if self.tool == "podman":
            return _ok("podman", "image", "exists", image)
        return _ok(self.tool, "image", "inspect", image)

    def __call__(self, *argv: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run([self.tool, *argv], capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.tool} {' '.join(argv[:3])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


def engine() -> Engine:
    wanted = os.environ.get("CONTAINER_TOOL", "").strip()
    candidates = [wanted] if wanted else ["docker", "podman"]
    tried = []
    for tool in candidates:
        if shutil.which(tool) is None:
            tried.append(f"{tool}: not installed")
        elif not _ok(tool, "info"):
            tried.append(f"{tool}: `{tool} info` fails (no daemon, or no permission)")
        else:
            return Engine(tool)
    raise Unavailable("no container tool can run containers here (" + "; ".join(tried)
                      + "); make test installs Debian's podman and runc when it runs as root")


def base_image(eng: Engine) -> str:
    chosen = os.environ.get("BASE_IMAGE", "").strip()
    if chosen:
        return chosen
    if eng.has_image(DEFAULT_BASE):
        return DEFAULT_BASE
    recipe = hashlib.sha256(" ".join(MMDEBSTRAP).encode()).hexdigest()[:12]
    tag = f"localhost/incident-response-base:bookworm-{recipe}"
    if eng.has_image(tag):
        return tag
    if shutil.which("mmdebstrap") is None:
        raise AssertionError(f"no base image: {DEFAULT_BASE} is not present, no registry is assumed, and mmdebstrap "
                          "(Debian package) is missing to build one; set BASE_IMAGE or install mmdebstrap")
    build = subprocess.Popen(MMDEBSTRAP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        imported = subprocess.run([eng.tool, "import", "-", tag], stdin=build.stdout, capture_output=True, text=True, timeout=900)
    finally:
        build.stdout.close()
        stderr = build.stderr.read().decode(errors="replace")
        build.wait(timeout=60)
    if build.returncode != 0 or imported.returncode != 0:
        raise AssertionError(f"building the Debian base image failed: mmdebstrap {build.returncode}: {stderr[-2000:]}\n"
                             f"{eng.tool} import {imported.returncode}: {imported.stderr[-2000:]}")
    return tag
