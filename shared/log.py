"""Structured logs: one JSON object per line on stderr.

Operators grep for fixed phrases (``Received webhook``, ``Error creating
incident``, ``Unauthorized``, ``Running diagnostics``), so the message stays
a plain phrase and the details go in fields. Known secret values are masked
in every line as a last line of defence: a secret URL (a Slack webhook) is
masked by its significant parts too, because libraries quote a URL's path or
a segment of it without the rest (``Max retries exceeded with url: /services/…``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlsplit

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
MASK = "****"
# A path segment or query value is taken for a token (Slack's T…/B…/<24
# characters>) when it is long, or shorter but not a plain lowercase word
# such as "services" or "hooks".
_TOKEN_MIN = 8
_ALWAYS_TOKEN = 16
_PART_MIN = 6
_PLAIN_WORD = re.compile(r"^[a-z][a-z-]*$")


def _is_token(part: str) -> bool:
    return len(part) >= _ALWAYS_TOKEN or (len(part) >= _TOKEN_MIN and not _PLAIN_WORD.match(part))
_URL = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"<>()\[\]{}]+""")


class Secrets:
    """Values masked wherever they would appear. The process has one,
    ``SECRETS``: ``register_secret`` and ``redact`` use it, and so does every
    ``JsonFormatter`` not given another (a test's own, which it can drop)."""

    def __init__(self) -> None:
        self._values: list[str] = []  # longest first, so a whole URL is masked before its parts

    def register(self, value: str | None) -> None:
        """Mask this value wherever it would appear in a log line; for an http(s)
        URL also its path, the path's tails and every token-like segment."""
        if not value or len(value) < 4:
            return
        parts = {value} | _url_parts(value)
        for part in parts:
            if part not in self._values:
                self._values.append(part)
        self._values.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every registered secret, and every significant part of a
        secret URL, replaced by ``****``."""
        for secret in self._values:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


SECRETS = Secrets()


def register_secret(value: str | None) -> None:
    """Mask this value in every log line of the process (``Secrets.register``)."""
    SECRETS.register(value)


def _url_parts(value: str) -> set[str]:
    try:
        url = urlsplit(value)
    except ValueError:
        return set()
    if url.scheme not in ("http", "https") or not url.netloc:
        return set()
    parts = {value.split("://", 1)[1]}
    if url.password and len(url.password) >= 4:
        parts.add(url.password)
    path = url.path + (f"?{url.query}" if url.query else "")
    segments = [s for s in url.path.split("/") if s]
    if len(path.strip("/")) >= _PART_MIN:
        parts.add(path)
    for i in range(len(segments)):
        tail = "/".join(segments[i:])
        if "/" in tail and len(tail) >= _TOKEN_MIN:
            parts.add(tail)
    candidates = segments + [v for _, v in parse_qsl(url.query)]
    parts |= {s for s in candidates if _is_token(s)}
    return parts


def redact(text: str) -> str:
    """``text`` with the process's registered secrets masked (``Secrets.redact``)."""
    return SECRETS.redact(text)


# C0 controls and DEL, but the newline and the tab.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def scrub(text: str | None, limit: int = 300, secrets: Secrets = SECRETS) -> str | None:
    """What may be stored (timeline, dead letters, API answers) of an error
    text: no URL at all (an error may quote a secret one) and no secret."""
    if text is None:
        return None
    # Control characters go too, after the secrets (one may hold one):
    # PostgreSQL stores no NUL in text or JSONB (an answer quoting one could
    # not be recorded at all), and a terminal obeys the others.
    cleaned = _CONTROL.sub("\ufffd", secrets.redact(_URL.sub("<url>", text)))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


# Secrets recognised by their shape, for text we did not write and whose
# secrets we cannot know in advance (a container's log lines): each pattern
# keeps what says what the value was and masks the value.
_SECRET_PATTERNS = [
    # A PEM private key, whole (the body spans lines); an unterminated one to the end.
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)", re.S), "[private key " + MASK + "]"),
    # A line of key material alone (a PEM body whose BEGIN line was cut off).
    (re.compile(r"(?m)^[A-Za-z0-9+/]{40,}={0,2}$"), MASK),
    (re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----"), "[private key " + MASK + "]"),
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + MASK),
    # "Authorization: Token <key>" (Django REST, GitHub): long and with a digit,
    # so "token refreshed" stays readable.
    (re.compile(r"(?i)\b(token)(\s+)(?=[A-Za-z0-9._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{16,}"), r"\1\2" + MASK),
    # A secret passed as a command-line flag's separate argument.
    (re.compile(r"(?i)(--(?:pass(?:word|wd|phrase)?|token|secret|api[_-]?key)\s+)[^\s-][^\s]*"), r"\1" + MASK),
    # A Slack incoming webhook URL is its own secret.
    (re.compile(r"(hooks\.slack\.com/(?:services|workflows|triggers)/)[A-Za-z0-9/_-]+"), r"\1" + MASK),
    # user:password@ in any URL
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"]*:)[^\s@/'\"]+@"), r"\1" + MASK + "@"),
    # password=..., token: ..., "secret": "...", api_key=..., and friends
    (re.compile(r"""(?i)((?:passphrase|pass(?:word|wd)?|pwd|token|(?:secret|private|signing|encryption)[_-]?key|secret|api[_-]?key|access[_-]?key|client[_-]?secret|credentials?)["']?\s*[=:]\s*["']?)[^\s"',;&]+"""),
     r"\1" + MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),  # AWS access key id
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), MASK),  # Google API key
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"), MASK),  # GitHub tokens
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), MASK),  # Slack tokens
    (re.compile(r"\bsk_(?:live|test)_[A-Za-z0-9]{16,}\b"), MASK),  # Stripe keys
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), MASK),  # GitLab personal access tokens
    (re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"), MASK),  # npm tokens
    (re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}"), MASK),  # OpenAI-style keys
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"), MASK),  # a JWT anywhere
]


def redact_patterns(text: str) -> str:
    """``text`` with secrets recognised by their shape masked (bearer tokens,
    passwords in URLs, ``password=``/``token=``/``secret=`` values, private
    keys, common cloud keys), then every registered secret as ``redact``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return redact(text)


class JsonFormatter(logging.Formatter):
    def __init__(self, *args, secrets: Secrets = SECRETS, **kwargs):
        super().__init__(*args, **kwargs)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.secrets.redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure(level: str = "INFO") -> None:
    """Install the JSON handler on the root logger once per process."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Request lines of the dev server would otherwise be plain text.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
