"""The notification channels, one module each. Adding a channel is one
module implementing :class:`~functions.escalation.channels.base.Channel`,
its settings in ``shared/config.py`` (secrets declared with
``shared.config.secret``), and one line in :data:`REGISTRY`.

The order is the order of sending: the page first.
"""

from __future__ import annotations

import logging

from functions.escalation.channels.base import Channel, Note, Outgoing
from functions.escalation.channels.pagerduty import PagerDuty
from functions.escalation.channels.slack import Slack
from functions.escalation.channels.teams import Teams
from functions.escalation.channels.webhook import Webhook
from shared.config import Settings

REGISTRY: tuple[type[Channel], ...] = (PagerDuty, Slack, Teams, Webhook)

__all__ = ["Channel", "Note", "Outgoing", "REGISTRY", "build", "name_the_ones_off"]


def build(config: Settings) -> list[Channel]:
    return [channel(config) for channel in REGISTRY]


def name_the_ones_off(channels: list[Channel], log: logging.Logger) -> None:
    """One warning per channel whose settings are absent, at start."""
    for channel in channels:
        if not channel.configured():
            log.warning(f"{channel.title} is off: {channel.setting} is not set")
