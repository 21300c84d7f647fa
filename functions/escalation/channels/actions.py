"""The remediation actions a chat message lists: the incident's current
generation and root only, newest first, and a line saying how many more the
incident page has. When space runs out the oldest lines go, never the
newest: the failure that paged someone is the last action taken.

The stored list is the history of every generation (a reopened incident
keeps it); :func:`shared.domain.current_actions` picks this round's.
"""

from __future__ import annotations

from typing import Callable

from functions.escalation.channels.text import utf16_len
from shared.domain import action_scope, current_actions

LINE_MIN = 40  # below this the newest line takes the whole room, the "more" line none


def _more(older: int, earlier: int, same_round: bool) -> str:
    parts = []
    if older:
        parts.append(f"{older} older action{'' if older == 1 else 's'}")
    if earlier:
        parts.append(f"{earlier} earlier action{'' if earlier == 1 else 's'} of previous "
                     f"{'generations or roots' if same_round else 'generations'}")
    return f"and {', and '.join(parts)}, on the incident page" if parts else ""


def newest_first(incident: dict, limit: int, render: Callable[[dict, int], str], sep: str) -> str:
    """The current actions, each drawn by ``render(record, limit)`` (the
    channel's own escaped markup, at most ``limit`` UTF-16 units), newest
    first and joined by ``sep``, then ``and 2 older actions, and 36 earlier
    actions of previous generations, on the incident page`` when there is
    more: at most ``limit`` units in all. The oldest lines go first; the
    newest alone is cut inside only when it does not fit beside that line."""
    actions, earlier = current_actions(incident)
    now = (incident.get("generation") or 0, incident.get("root_generation") or 0)
    # Earlier records of this generation: a new root took over this round.
    same_round = earlier > 0 and any(
        isinstance(a, dict) and action_scope(a)[0] == now[0] and action_scope(a) != now
        for a in incident.get("remediation_actions") or [])
    if not actions:
        more = _more(0, earlier, same_round)
        return f"none in this generation{sep}{more}" if more else "none"
    lines = [render(a, limit) for a in actions]
    gap = utf16_len(sep)
    total = sum(utf16_len(line) for line in lines) + gap * (len(lines) - 1)
    for shown in range(len(lines), 0, -1):
        more = _more(len(lines) - shown, earlier, same_round)
        if total + (gap + utf16_len(more) if more else 0) <= limit:
            return sep.join(lines[:shown] + ([more] if more else []))
        total -= utf16_len(lines[shown - 1]) + (gap if shown > 1 else 0)
    more = _more(len(lines) - 1, earlier, same_round)
    room = limit - (gap + utf16_len(more) if more else 0)
    if not more or room < LINE_MIN:
        return render(actions[0], limit)
    return sep.join([render(actions[0], room), more])
