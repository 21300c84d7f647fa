"""What a channel makes of a ``2xx`` answer (its ``accept``). Apart from
:mod:`functions.escalation.delivery`, so that the channels, built at start,
import no HTTP client."""

from __future__ import annotations

import enum
from typing import Callable
from urllib.parse import urlsplit


class Answer(enum.Enum):
    ACCEPTED = "accepted"
    # Not the service's answer (a proxy's or a portal's page, a wrong
    # endpoint): the notification did not arrive, and may later.
    UNRECOGNISED = "unrecognised"
    # The service's own "no" (Slack's "ok": false): it will not get better.
    REFUSED = "refused"


def accept_any_2xx(status: int, body: str) -> Answer:
    """For a receiver whose success has no body to check: the status decides."""
    return Answer.ACCEPTED


Judge = Callable[[int, str], Answer]


def judged_on_own_hosts(url: str, hosts: frozenset[str], judge: Judge) -> Judge:
    """``judge`` for a URL on one of the service's own ``hosts``; the status
    alone anywhere else: a relay or a compatible receiver behind the setting
    has words of its own for "accepted"."""
    return judge if (urlsplit(url).hostname or "").lower() in hosts else accept_any_2xx
