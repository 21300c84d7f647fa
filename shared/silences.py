"""AlertManager silences through its API v2 (``ALERTMANAGER_URL``).

A silence made from an incident matches the alert's own labels exactly
(``isEqual``, not a regex), so it silences that alert and nothing broader.
AlertManager is the record of its silences: they are read back from it,
never copied into our database (the incident's timeline notes who created
or expired one).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import re2

from shared.errors import BadGateway, NotFound, ServiceUnavailable
from shared.matchers import compile_regex
from shared.timefmt import rfc3339

if TYPE_CHECKING:
    import requests

log = logging.getLogger("silences")

ACTIVE_STATES = ("active", "pending")
SILENCE_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def matchers_for(labels: dict) -> list[dict]:
    return [{"name": k, "value": str(v), "isRegex": False, "isEqual": True} for k, v in sorted(labels.items())]


def _matches(matcher: dict, labels: dict) -> bool:
    actual = labels.get(matcher.get("name"), "")
    if matcher.get("isRegex"):
        try:
            # RE2, as AlertManager: any silence's regex, whoever made it, is
            # matched in linear time.
            hit = compile_regex(str(matcher.get("value", ""))).fullmatch(actual) is not None
        except re2.error:
            return False
    else:
        hit = actual == matcher.get("value")
    return hit if matcher.get("isEqual", True) else not hit


def silences_labels(silence: dict, labels: dict) -> bool:
    """Does this silence mute an alert with these labels (AlertManager's rule)?"""
    matchers = silence.get("matchers") or []
    return bool(matchers) and all(_matches(m, labels) for m in matchers)


def _json(response: requests.Response):
    # A wrong ALERTMANAGER_URL (a proxy's login page) answers 200 with HTML:
    # a bad gateway, not our crash, and never the incident page's. A charset
    # that cannot be decoded (idna) is read as UTF-8 (answer_json).
    from shared.deadline import answer_json

    try:
        return answer_json(response)
    except ValueError:
        raise BadGateway(f"AlertManager answered {response.headers.get('Content-Type') or 'no content type'}, "
                         "not JSON; is ALERTMANAGER_URL AlertManager?") from None


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return None


class AlertManager:
    def __init__(self, base_url: str, timeout: float = 5.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        import requests  # an AlertManager client only when a silence is read or made

        from shared.deadline import bounded

        self.http = bounded(requests.Session())

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call, its whole answer within the timeout (shared.deadline):
        an AlertManager that trickles its answer is one that did not answer,
        not a request of the board held open."""
        import requests

        from shared import deadline

        try:
            response = deadline.request(self.http, method, self.base + path, self.timeout, **kwargs)
        except deadline.UNUSABLE_URL as exc:
            # A host name label over 63 characters, no scheme: a setting to
            # fix, which no retry mends (and not our crash, a 500).
            setting = deadline.unusable_setting(exc, "ALERTMANAGER_URL")
            log.error(f"{setting} is not a URL a request can be made to", extra={"error": type(exc).__name__})
            raise BadGateway(f"AlertManager cannot be called: {type(exc).__name__}; "
                             f"is {setting} a URL a request can be made to?") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            # ChunkedEncodingError: the connection dropped inside the answer.
            raise ServiceUnavailable(f"AlertManager did not answer: {type(exc).__name__}; retry later") from None
        except requests.RequestException as exc:
            if not deadline.answered(exc):
                # Failed before any answer (a header requests refuses to
                # send): nothing AlertManager said, so not blamed on it.
                log.error("AlertManager request could not be made", extra={"error": type(exc).__name__})
                raise BadGateway(f"AlertManager was not called: the request could not be made ({type(exc).__name__})") from None
            # It answered, and the answer cannot be read: a body whose
            # Content-Encoding it is not in (ContentDecodingError, a broken
            # gzip), a redirect loop, a redirect that points nowhere. An
            # unreadable answer, as one that is not JSON (_json): a bad
            # gateway, never our crash.
            raise BadGateway(f"AlertManager's answer could not be read: {type(exc).__name__}; "
                             "is ALERTMANAGER_URL AlertManager?") from None
        if response.status_code == 404 and method == "DELETE":
            raise NotFound("AlertManager has no such silence")
        if response.status_code >= 400:
            raise BadGateway(f"AlertManager refused the request ({response.status_code}): "
                             f"{deadline.answer_text(response)[:300].strip()}")
        return response

    def create(self, labels: dict, starts_at: datetime, ends_at: datetime, created_by: str, comment: str) -> str:
        body = {"matchers": matchers_for(labels), "startsAt": rfc3339(starts_at), "endsAt": rfc3339(ends_at),
                "createdBy": created_by, "comment": comment}
        answer = _json(self._call("POST", "/api/v2/silences", json=body))
        if not isinstance(answer, dict) or not isinstance(answer.get("silenceID"), str):
            raise BadGateway("AlertManager's answer names no silenceID; is ALERTMANAGER_URL AlertManager?")
        return answer["silenceID"]

    def for_labels(self, labels: dict) -> list[dict]:
        """The active and pending silences that mute these labels, soonest expiry first."""
        answer = _json(self._call("GET", "/api/v2/silences"))
        if not isinstance(answer, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), str)
                                                   and isinstance(s.get("status") or {}, dict)
                                                   and isinstance(s.get("matchers") or [], list) for s in answer):
            raise BadGateway("AlertManager's answer is not a list of silences; is ALERTMANAGER_URL AlertManager?")
        found = [s for s in answer if (s.get("status") or {}).get("state") in ACTIVE_STATES
                 and all(isinstance(m, dict) for m in s.get("matchers") or []) and silences_labels(s, labels)]
        return sorted(({"id": s["id"], "state": s["status"]["state"], "starts_at": _time(s.get("startsAt")),
                        "ends_at": _time(s.get("endsAt")), "created_by": s.get("createdBy"), "comment": s.get("comment"),
                        "matchers": s.get("matchers")} for s in found), key=lambda s: (s["ends_at"] or datetime.max, s["id"]))

    def expire(self, silence_id: str) -> None:
        self._call("DELETE", f"/api/v2/silence/{silence_id}")


def duration_of(minutes) -> timedelta:
    return timedelta(minutes=minutes)
