"""Text helpers every channel shares: cutting untrusted text between
user-perceived characters, counting it the way receivers count, and the
incident facts a message shows (summary, description, service, link).

Everything that comes from an alert (names, labels, annotations, probe
output, action errors) is untrusted text of any length. Each channel escapes
it for its own markup (Slack's entities, Teams' Markdown) through
:func:`fit`, which cuts *before* it escapes, one cluster at a time, so no
escape sequence, surrogate pair or combining sequence is ever cut in half,
and shows the characters that reorder or hide text (a bidi override in an
alert name) as ``‹U+202E›``.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Callable, Iterable, Iterator

from shared.config import Settings
from shared.domain import service_of as domain_service_of
from shared.visible import visible_parts

ELLIPSIS = "…"
TRANSITION_TITLES = {
    "opened": "opened",
    "root_changed": "is now the root of the incident",
    "acknowledged": "acknowledged",
    "remediated": "remediated automatically",
    "remediation_failed": "needs a human: remediation did not fix it",
    "resolved": "resolved",
}
LINK_MAX = 2048


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _extends(ch: str, previous: str) -> bool:
    """Does ``ch`` belong to the user-perceived character before it?"""
    cp = ord(ch)
    if previous.endswith("\u200d") or ch == "\u200d":
        return True
    if unicodedata.category(ch) in ("Mn", "Me", "Mc"):
        return True
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:  # variation selectors
        return True
    if 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:  # skin tones, emoji tags
        return True
    if _regional(ch) and len(previous) == 1 and _regional(previous):  # a flag is two
        return True
    return ch == "\n" and previous == "\r"


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def clusters(text: str) -> Iterator[str]:
    """``text`` in units that must never be split: a base character with its
    combining marks, ZWJ sequences, variation selectors, flags."""
    current = ""
    for ch in text:
        if current and _extends(ch, current):
            current += ch
        else:
            if current:
                yield current
            current = ch
    if current:
        yield current


class Raw(str):
    """Our own markup (``*Priority*``, emoji codes, a link we built): sent as
    is and never cut inside."""


def _as_is(text: str) -> str:
    return text


def prefix(text: str, limit: int) -> str:
    """As much of ``text`` as a cut to ``limit`` UTF-16 units can show, so
    that the work of cutting is bounded by the limit, not by what was stored
    (a megabyte of an action's error). Every character takes at least one
    unit, shown or escaped, so none past ``limit`` is ever shown; the margin
    keeps the characters :mod:`shared.visible` judges by their neighbours
    (a joiner, a selector) judged as in the whole text. A cluster the cut
    splits lies past the limit: it is dropped whole, as it would have been."""
    return text[:2 * limit + 8]


def fit(pieces: Iterable[str], limit: int, escape: Callable[[str], str] = _as_is, lines: bool = True) -> str:
    """Join ``pieces`` (data, or :class:`Raw` markup) into at most ``limit``
    UTF-16 units. Data is cut between clusters first and escaped after, one
    cluster at a time, so an escape is whole or absent; a cut ends in ``…``.
    Its characters that reorder or hide text are shown as ``‹U+202E›``
    (:mod:`shared.visible`): they could reorder or hide what a person reads;
    with ``lines=False`` (a header, a one-line field) its tabs and line
    breaks too. Only the :func:`prefix` of each piece is read."""
    units: list[str] = []
    for piece in pieces:
        if isinstance(piece, Raw):
            units.append(str(piece))
        else:
            # Characters that reorder or hide text shown (‹U+202E›), each
            # as one unit: a cut never splits one. Judged on the whole piece
            # (a ZWNJ between two Persian letters is kept: it needs both).
            for part, shown in visible_parts(prefix(piece, limit), lines):
                units.extend([escape(part)] if shown else (escape(c) for c in clusters(part)))
    lengths = [utf16_len(u) for u in units]
    if sum(lengths) <= limit:
        return "".join(units)
    budget, used, kept = limit - utf16_len(ELLIPSIS), 0, []
    for unit, n in zip(units, lengths, strict=True):
        if used + n > budget:
            break
        kept.append(unit)
        used += n
    return "".join(kept) + ELLIPSIS


def cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut between clusters and ending in
    ``…``, nothing shown or escaped: text for a program to read."""
    if len(text) <= limit:
        return text
    kept, used = [], 0
    for cluster in clusters(prefix(text, limit)):
        if used + len(cluster) > limit - len(ELLIPSIS):
            break
        kept.append(cluster)
        used += len(cluster)
    return "".join(kept) + ELLIPSIS


def plain(text: str, limit: int, lines: bool = True) -> str:
    """Cut, unescaped, between clusters."""
    return fit([text], limit, lines=lines)


# --------------------------------------------------------------------------- incident facts


def service_of(incident: dict) -> str | None:
    return domain_service_of(incident.get("labels") or {})


def incident_url(config: Settings, incident_id: str) -> str:
    return f"{config.public_url}/ui/incidents/{incident_id}"


def runbook_url(incident: dict) -> str | None:
    """The alert's runbook link, only when it is a plain http(s) URL of sane length."""
    runbook = (incident.get("annotations") or {}).get("runbook_url", "")
    if isinstance(runbook, str) and runbook.startswith(("http://", "https://")) and len(runbook) <= LINK_MAX:
        return runbook
    return None


def summary_of(incident: dict) -> str:
    """What the alert says in one line. Rules write `summary`, `message`,
    `title` or only `description`; any of them beats the alert name alone."""
    annotations = incident.get("annotations") or {}
    for candidate in (incident.get("summary"), annotations.get("summary"), annotations.get("message"),
                      annotations.get("title"), incident.get("description"), annotations.get("description")):
        if isinstance(candidate, str):
            line = next((ln.strip() for ln in candidate.splitlines() if ln.strip()), "")
            if line:
                return line
    return "no summary or description in the alert"


def description_of(incident: dict) -> str:
    annotations = incident.get("annotations") or {}
    text = incident.get("description") or annotations.get("description") or ""
    return text.strip() if isinstance(text, str) else ""


def diagnostics_summary(diagnostics: Any) -> dict:
    if not isinstance(diagnostics, dict) or not diagnostics:
        return {}
    pods = diagnostics.get("pods")
    if isinstance(pods, dict) and "error" not in pods:
        pods = {name: {k: v.get(k) for k in ("ready", "status", "restarts")} for name, v in pods.items() if isinstance(v, dict)}
    return {"pods": pods, "metrics": diagnostics.get("metrics"), "dependencies": diagnostics.get("dependencies")}


# The people paged see the few most likely causes, each summary bounded; the
# board has the rest and the evidence.
CAUSES_SHOWN = 3
CAUSE_SUMMARY_MAX = 300
CAUSE_EVIDENCE_MAX = 5


def probable_causes_brief(diagnostics: Any) -> list[dict]:
    """The first CAUSES_SHOWN probable causes, bounded, for a page or a message."""
    causes = diagnostics.get("probable_causes") if isinstance(diagnostics, dict) else None
    out = []
    for c in (causes if isinstance(causes, list) else [])[:CAUSES_SHOWN]:
        if not isinstance(c, dict) or not isinstance(c.get("cause"), str):
            continue
        evidence = c.get("evidence") if isinstance(c.get("evidence"), list) else []
        out.append({"cause": plain(c["cause"], 40), "confidence": c.get("confidence"),
                    "summary": plain(str(c.get("summary") or ""), CAUSE_SUMMARY_MAX),
                    "evidence": [plain(str(e), 120) for e in evidence[:CAUSE_EVIDENCE_MAX]]})
    return out


def diagnostics_lines(diagnostics: Any) -> list[tuple[str, str]]:
    """(name, value) lines of the diagnostics summary, as chat channels show
    them; empty when nothing was collected."""
    d = diagnostics_summary(diagnostics)
    lines: list[tuple[str, str]] = []
    pods = d.get("pods")
    if isinstance(pods, dict):
        lines += [(str(name), f"{v.get('ready')} ready, {v.get('status')}") for name, v in pods.items()
                  if isinstance(v, dict) and "ready" in v]
        if "error" in pods:
            lines.append(("pods", str(pods["error"])))
    elif pods:
        lines.append(("pods", str(pods)))
    metrics = d.get("metrics")
    if isinstance(metrics, dict):
        lines += [(str(k), str(v)) for k, v in metrics.items() if not isinstance(v, dict)]
    deps = d.get("dependencies")
    if isinstance(deps, dict) and deps:
        lines.append(("dependencies", ", ".join(f"{k} {v if isinstance(v, str) else 'error'}" for k, v in deps.items())))
    return lines
