"""Prometheus' instant-query API (``/api/v1/query``), read by remediation's
verification and by correlation's kube-state-metrics topology: one place
that decides what counts as an answer. An answer without a result list is
no answer: read as "nothing returned", it would verify an alert as stopped
or place no pod, so it raises like a refused query."""

from __future__ import annotations


def instant(url: str, promql: str, timeout: float) -> list:
    """The ``result`` list of an instant query; RuntimeError when Prometheus
    refuses or answers something else, requests' errors when unreachable or
    when the whole answer did not come within ``timeout``, one of
    ``shared.deadline.UNUSABLE_URL`` (requests' too) when ``url`` is no URL
    a request can be made to (shared.deadline:
    a Prometheus, or a proxy before it, that trickles its answer is a failed
    query at the timeout, not a probe held open)."""
    import requests

    from shared import deadline

    with deadline.bounded(requests.Session()) as http:
        response = deadline.request(http, "GET", url.rstrip("/") + "/api/v1/query", timeout,
                                    params={"query": promql}, allow_redirects=True)
    # answer_json / answer_text: a charset that cannot be decoded (idna)
    # is read as UTF-8, never a bare UnicodeError out of a probe.
    body = deadline.answer_json(response) if response.headers.get("content-type", "").startswith("application/json") else {}
    body = body if isinstance(body, dict) else {}
    if response.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"Prometheus answered {response.status_code}: {body.get('error') or deadline.answer_text(response)[:200]}")
    data = body.get("data")
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list):
        raise RuntimeError(f"Prometheus answered without a result list: {deadline.answer_text(response)[:200]}")
    return result
