"""The official Kubernetes client, configured once and imported lazily
(it costs ~0.4 s of import time, which a scale-to-zero cold start feels).

In a pod the in-cluster service account is used; elsewhere the kubeconfig
that ``KUBECONFIG`` names (or ``~/.kube/config``). Without either, the
integration is off and says so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("kube")


def _package_without_extras() -> None:
    """Make ``kubernetes`` a bare package, so that ``from kubernetes import
    client, config`` loads those two and not the rest.

    The package's ``__init__`` imports every subpackage: the dynamic client
    (with kubernetes-validate and jsonschema where installed), watch,
    stream (websocket-client), leaderelection, informer. Nothing here uses
    them; they added ~75 modules, ~3.5 MB per process and ~0.3 s to the
    first request that needs the cluster. A subpackage is still imported
    normally by whoever names it (``from kubernetes import watch``). Does
    nothing when the package is already imported (or not installed)."""
    if "kubernetes" in sys.modules:
        return
    spec = importlib.util.find_spec("kubernetes")
    if spec is not None:
        package = importlib.util.module_from_spec(spec)
        package.__getattr__ = _version  # the dynamic client's discovery cache reads kubernetes.__version__
        sys.modules["kubernetes"] = package


def _config_without_both_loaders() -> None:
    """Make ``kubernetes.config`` a package whose ``__init__`` runs on first
    use of one of its names, so that ``_configure`` loads only the loader it
    uses. The ``__init__`` imports both: a pod reads its service account
    (incluster_config, a few lines), but the kubeconfig loader brings
    requests, requests-oauthlib, oauthlib and YAML with it (~5 MB per
    process, which diagnostics otherwise never loads). ``from kubernetes
    import config`` still works as documented: its first attribute runs the
    real ``__init__``. Does nothing when the package is already imported."""
    if "kubernetes.config" in sys.modules or importlib.util.find_spec("kubernetes") is None:
        return
    spec = importlib.util.find_spec("kubernetes.config")
    package = importlib.util.module_from_spec(spec)

    def initialise(name: str):
        if package.__dict__.pop("__getattr__", None) is None:
            raise AttributeError(f"module 'kubernetes.config' has no attribute {name!r}")
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = initialise
    sys.modules["kubernetes.config"] = package
    sys.modules["kubernetes"].config = package


def _version(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module 'kubernetes' has no attribute {name!r}")
    from importlib.metadata import version  # ~0.1 s of import: only when asked

    return version("kubernetes")


_package_without_extras()
_config_without_both_loaders()
_lock = threading.Lock()
_client = None
_state = {"checked": False, "configured": False, "reason": ""}


def _configure():
    from kubernetes import client

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        from kubernetes.config.incluster_config import load_incluster_config

        load_incluster_config()
        return _bounded_api_client(None), "in-cluster service account"
    path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not Path(path).exists():
        return None, f"no in-cluster config and no kubeconfig at {path}"
    from kubernetes.config.kube_config import load_kube_config

    configuration = client.Configuration()
    load_kube_config(config_file=path, client_configuration=configuration)
    return _bounded_api_client(configuration), f"kubeconfig {path}"


def _bounded_api_client(configuration):
    """The ApiClient, every request of it bounded as a whole exchange within
    its ``_request_timeout`` (shared/kubebound.py). Imported once a
    configuration is loaded: it brings the client's REST module, which a
    configuration that fails to load never needs."""
    from shared.kubebound import api_client

    return api_client(configuration)


def api_client():
    """The shared ApiClient, or None when Kubernetes is not configured.
    Each of its requests ends within its ``_request_timeout`` as a whole
    (shared/kubebound.py); one without a timeout is refused."""
    global _client
    with _lock:
        if not _state["checked"]:
            _state["checked"] = True
            try:
                _client, how = _configure()
            except Exception as exc:  # noqa: BLE001 - a broken config turns the integration off, loudly
                _client, how = None, f"configuration failed: {exc}"
            _state["configured"] = _client is not None
            _state["reason"] = how
            if _client is None:
                log.warning("Kubernetes is not configured: %s", how, extra={"reason": how})
            else:
                log.info("Kubernetes configured", extra={"via": how})
    return _client


def not_configured_reason() -> str:
    api_client()
    return _state["reason"]


def reset() -> None:
    global _client
    with _lock:
        _client = None
        _state.update(checked=False, configured=False, reason="")
