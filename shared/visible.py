"""Characters that reorder or hide text, made visible wherever a person
reads what an alert said.

Bidirectional controls (U+202A–U+202E embeddings and overrides, U+2066–U+2069
isolates, and the marks U+200E, U+200F, U+061C) reorder the text around
them; zero-width characters (U+200B–U+200D, U+2060–U+2064, U+FEFF) hide
inside it. In an alert name they spoof another one ("trojan source": a
``DiskFull`` that reads as something else, a name that hides a second
word). The stored record keeps them as they came; every rendering for a
person (the board and its report draft, Slack, PagerDuty, Teams) shows each
as ``‹U+202E›`` through :func:`visible`. A zero-width joiner between two
emoji (a family, a flag sequence) is how those are written, and is kept.
"""

from __future__ import annotations

import re

HIDDEN = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_ZWJ = "\u200d"


def _pictographic(ch: str) -> bool:
    cp = ord(ch)
    return (0x1F000 <= cp <= 0x1FAFF or 0x2190 <= cp <= 0x2BFF or cp == 0xFE0F  # emoji, symbols, the emoji presentation selector
            or 0xE0020 <= cp <= 0xE007F)  # emoji tags


def _shown(match: re.Match) -> str:
    ch, text, at = match.group(), match.string, match.start()
    if ch == _ZWJ and 0 < at < len(text) - 1 and _pictographic(text[at - 1]) and _pictographic(text[at + 1]):
        return ch
    return f"‹U+{ord(ch):04X}›"


def visible(text: str) -> str:
    """``text`` with every bidirectional control and zero-width character
    written as ``‹U+XXXX›``; anything else as it is."""
    return HIDDEN.sub(_shown, text) if HIDDEN.search(text) else text


def visible_deep(value):
    """:func:`visible` on every string (and key) of a JSON-like value."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {visible(k) if isinstance(k, str) else k: visible_deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [visible_deep(v) for v in value]
    return value
