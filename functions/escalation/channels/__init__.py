"""The notification channels, one module each. Adding a channel is one
module implementing :class:`~functions.escalation.channels.base.Channel`,
its settings in ``shared/config.py`` (secrets declared with
``shared.config.secret``), and one line in :data:`REGISTRY`.

The order is the order of sending: the page first.
"""

from __future__ import annotations

from functions.escalation.channels.base import Channel, Note, Outgoing
from functions.escalation.channels.pagerduty import PagerDuty
from functions.escalation.channels.slack import Slack
from functions.escalation.channels.teams import Teams
from functions.escalation.channels.webhook import Webhook
from shared.config import Settings

REGISTRY: tuple[type[Channel], ...] = (PagerDuty, Slack, Teams, Webhook)

__all__ = ["Channel", "Note", "Outgoing", "REGISTRY", "build"]


def build(config: Settings) -> list[Channel]:
    return [channel(config) for channel in REGISTRY]
