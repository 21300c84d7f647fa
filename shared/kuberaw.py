"""Kubernetes API calls through the official client's ``ApiClient``, JSON
in and JSON out, without the generated API classes.

A generated class's module (``CoreV1Api``, ``AppsV1Api``, ...) imports the
pydantic model of every type its methods name: ``CoreV1Api`` costs ~1 s of
CPU and ~20 MB per process, ``AppsV1Api`` ~0.5 s and ~11 MB, paid by the
first call of a cold instance. A call here is what the generated method
sends with ``_preload_content=False``: the same path, query names,
``Accept`` and ``Content-Type``, with the client's configuration,
credentials and TLS, and a non-``2xx`` answer raised as the client's
``ApiException``. Callers that read fields of a typed model keep the
generated classes.
"""

from __future__ import annotations

import json
from typing import Any


def request(api, method: str, path: str, path_params: dict | None = None, query: dict | None = None, body: Any = None,
            content_type: str | None = None, accept: str = "application/json", timeout: float | None = None) -> bytes:
    """The answer's body; ``path`` has ``{name}`` placeholders that
    ``path_params`` fill (quoted as the generated methods quote them).
    ``timeout`` bounds the whole exchange, the body included, on the
    client shared.kube builds (shared/kubebound.py), which refuses a call
    without one."""
    from kubernetes.client.exceptions import ApiException

    headers = {"Accept": accept}
    if content_type:
        headers["Content-Type"] = content_type
    serialized = api.param_serialize(
        method=method, resource_path=path, path_params=path_params or {},
        query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
        header_params=headers, body=body, auth_settings=["BearerToken"])
    response = api.call_api(*serialized, _request_timeout=timeout)
    response.read()
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return response.data


def call(api, method: str, path: str, path_params: dict | None = None, **options) -> dict:
    """:func:`request`, the answer parsed as JSON."""
    return json.loads(request(api, method, path, path_params, **options))
