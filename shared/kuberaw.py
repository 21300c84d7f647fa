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
from typing import Any, Callable

# A list that can be large (a namespace's pods) is read in pages of this
# many items, each page its own request within its own timeout: a timeout
# bounds one answer, and thousands of pods (megabytes each hundred) would
# not come in one within it, however steadily they flowed. A list that
# fits in one page is one request, as before.
LIST_PAGE_SIZE = 500
# At most this many pages are read (LIST_PAGE_SIZE times this many items):
# a larger list is refused (ListTooLong), not cut, since its readers judge
# the whole (how many pods are ready, a workload's share deleted); and the
# pages' timeouts add up to at most this many timeouts.
LIST_MAX_PAGES = 4


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


class ListTooLong(Exception):
    """A list with more than ``LIST_PAGE_SIZE * LIST_MAX_PAGES`` items."""

    def __init__(self, what: str):
        super().__init__(f"more than {LIST_PAGE_SIZE * LIST_MAX_PAGES} {what}: too many to read in "
                         f"{LIST_MAX_PAGES} pages of {LIST_PAGE_SIZE}")


def paged(read_page: Callable[[int, str | None], tuple[list, str | None]], what: str) -> list:
    """Every item of a list, read a page at a time: ``read_page(limit,
    token)`` is one request (``limit``, and ``continue`` when ``token`` is
    not None) answering (its items, the next page's token or None). The API
    server serves the pages from one snapshot of the list (a token it no
    longer keeps is its ``410 Gone``)."""
    items: list = []
    token = None
    for _ in range(LIST_MAX_PAGES):
        page, token = read_page(LIST_PAGE_SIZE, token)
        items.extend(page or [])
        if not token:
            return items
    raise ListTooLong(what)


def items(api, path: str, path_params: dict | None = None, query: dict | None = None, *, what: str, **options) -> list:
    """The items of a list :func:`call` reads, a page at a time (:func:`paged`)."""
    def read_page(limit: int, token: str | None) -> tuple[list, str | None]:
        answer = call(api, "GET", path, path_params, query={**(query or {}), "limit": limit, "continue": token}, **options)
        return answer.get("items") or [], (answer.get("metadata") or {}).get("continue") or None
    return paged(read_page, what)
