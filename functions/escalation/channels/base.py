"""What a notification channel is: one small protocol the escalation handler
loops over (:data:`functions.escalation.channels.REGISTRY`).

A channel is built from the settings and answers five questions: its name,
whether it is configured, what it sends for a transition (``None`` when the
transition means nothing to it), which answers mean "try again", and whether
a ``2xx`` answer is the service saying "accepted" (a proxy's or a captive
portal's page answers ``200`` too, and nothing arrived). The
handler does everything else the same way for every channel: the claim per
channel, action, incident, generation and transition, the timeline entry,
the retries within one time budget, the ``502`` when a notification is not
accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from functions.escalation.answer import Answer, accept_any_2xx
from shared.config import Settings
from shared.errors import Conflict

TRANSITIONS = ("opened", "root_changed", "acknowledged", "remediated", "remediation_failed", "resolved")
# Told as an opening is: only for the priorities a channel announces or pages on.
OPENINGS = ("opened", "root_changed")


@dataclass(frozen=True)
class Note:
    """Everything a channel may use to build its message, read from the
    database (never from the event).

    ``sent`` is what this channel has already delivered for the incident in
    any generation (its action names, ``trigger``…), so a channel can say
    "resolve only what I paged" itself, and in which generation
    (``trigger:1``: the action, a colon, the generation). ``reason`` is remediation's reason
    (remediated, remediation_failed), who acknowledged (acknowledged) or
    why another alert took over as root (root_changed). ``sending`` names
    the actions this channel is sending for the incident right now (a
    fresh claim, not yet recorded as sent), in the same form as ``sent``.
    ``covered`` (``acknowledged`` only, for a channel that ``follows_up``):
    the person's acknowledgement of this generation covers a page this
    channel sent that was decided before the acknowledgement: its sender
    saw no acknowledgement (shared.acknowledge.covered_page_sql). A page
    decided after it is not acknowledged on the person's behalf."""

    transition: str
    incident: dict
    reason: str | None = None
    sent: frozenset[str] = frozenset()
    # A remediation proposal waiting for approval: where to decide on it.
    proposal_url: str | None = None
    sending: frozenset[str] = frozenset()
    covered: bool = False


@dataclass(frozen=True)
class Outgoing:
    """One HTTP POST: ``action`` names it in the claim key and the timeline
    (``notify:{channel}:{action}:{incident}:{generation}:{transition}``).
    ``body`` is a JSON-able dict, or the exact bytes when a signature covers them."""

    action: str
    url: str
    body: dict | bytes
    headers: dict[str, str] = field(default_factory=dict)


class NotYet(Conflict):
    """Raised by ``message`` for a follow-up of a message still being sent
    (PagerDuty's ``resolve`` while its ``trigger`` is in flight): whether
    there is anything to follow up is not known yet. The handler answers
    ``409``, and the Broker's retry finds the first message recorded."""


def retry_by_default(status: int) -> bool:
    """Throttled or broken on their side: it may work later. Any other 4xx will not."""
    return status == 429 or status >= 500


@runtime_checkable
class Channel(Protocol):
    name: str
    # How its name reads in a log line ("PagerDuty is off").
    title: str
    # The variable that switches it on, named when it is off.
    setting: str

    def __init__(self, config: Settings) -> None: ...

    def configured(self) -> bool:
        """Are its settings present? When not, it is off and says so once."""

    def message(self, note: Note) -> Outgoing | None:
        """What it sends for this transition, or None when it means nothing to it."""

    def retry(self, status: int) -> bool:
        """Does this HTTP answer mean "send it again"?"""

    def accept(self, status: int, body: str) -> Answer:
        """What a ``2xx`` answer means: accepted, not the service's answer
        (retried), or the service's own refusal (not retried within the
        attempt; the handler answers 502 and the Broker redelivers). ``body``
        is the answer's text (at most 64 KiB of it, or what arrived of it
        within the attempt's bound). It should not raise: an answer its
        judge fails on counts as not the service's."""


def announces(config: Settings, note: Note) -> bool:
    """Chat channels tell every transition; an opening (or a new root, a
    follow-up of the opening) only for the priorities
    ANNOUNCE_ON_OPEN_PRIORITIES names."""
    return note.transition not in OPENINGS or note.incident["priority"] in config.announce_on_open_priorities


class ChatChannel:
    """A chat room's incoming webhook (its URL is the secret): it posts the
    message ``build`` makes for every transition it announces."""

    name: str
    title: str
    setting: str
    # (config, incident, transition, reason) -> the JSON body to post.
    build: Callable[[Settings, dict, str, str | None], dict]

    def __init__(self, config: Settings, url):
        self.config = config
        self.url = url

    def configured(self) -> bool:
        return bool(self.url)

    def retry(self, status: int) -> bool:
        return retry_by_default(status)

    def accept(self, status: int, body: str) -> Answer:
        return accept_any_2xx(status, body)

    def message(self, note: Note) -> Outgoing | None:
        if not announces(self.config, note):
            return None
        return Outgoing("message", self.url.reveal(), self.build(self.config, note.incident, note.transition, note.reason))
