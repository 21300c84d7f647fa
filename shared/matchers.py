"""Label matchers in AlertManager's syntax: ``name="value"``, ``name!="value"``,
``name=~"regex"``, ``name!~"regex"``.

As in AlertManager, a regex is anchored at both ends (``=~"db.*"`` does not
match ``mydb``), and a label that is absent has the value ``""`` (so
``team!="ops"`` matches an alert without a team label). Regexes are RE2's, as
in AlertManager: a pattern RE2 refuses (back-references, look-arounds,
possessive quantifiers) is refused, so a window never means something
AlertManager would not, and matching takes linear time. Python's backtracking
``re`` took hours on ``(a+)+b`` against a 40-character label, stalling the
intake for every alert while the window was active.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import re2

from shared.errors import BadRequest

OPERATORS = ("=~", "!~", "!=", "=")
NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))\s*$')
# Constructs RE2 does not have: back-references and look-arounds.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?[=!<]|\(\?P=")
MATCHERS_MAX = 20
VALUE_MAX = 1000

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.dot_nl = True
# re2 would print its parse errors to stderr as plain text, outside the JSON log.
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=1024)
def compile_regex(pattern: str):
    """The RE2 program of a pattern; raises ``re2.error``."""
    return re2.compile(pattern, _RE2_OPTIONS)


def regex_error(exc: Exception) -> str:
    message = exc.args[0] if exc.args else exc
    return message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str

    @property
    def is_regex(self) -> bool:
        return self.op in ("=~", "!~")

    @property
    def is_equal(self) -> bool:
        return self.op in ("=", "=~")

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.is_regex:
            hit = compile_regex(self.value).fullmatch(actual) is not None
        else:
            hit = actual == self.value
        return hit if self.is_equal else not hit

    def text(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{escaped}"'

    def as_alertmanager(self) -> dict:
        """The matcher object of AlertManager's API v2."""
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}


def parse(text: str, where: str = "matchers") -> Matcher:
    if not isinstance(text, str):
        raise BadRequest(f'{where}: each matcher must be a string like service="email"', field=where)
    found = _MATCHER.fullmatch(text)
    if not found:
        raise BadRequest(f'{where}: not a matcher (name="value", name!="value", name=~"regex", name!~"regex"): {text[:80]!r}',
                         field=where)
    name, op, quoted, bare = found.groups()
    value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    if len(value) > VALUE_MAX:
        raise BadRequest(f"{where}: a value is longer than {VALUE_MAX} characters", field=where)
    if "\x00" in value:
        raise BadRequest(f"{where}: contains a NUL character", field=where)
    if op in ("=~", "!~"):
        if _NOT_RE2.search(value):
            raise BadRequest(f"{where}: {value[:80]!r} uses back-references or look-arounds, which AlertManager's RE2 lacks",
                             field=where)
        try:
            compile_regex(value)
        except re2.error as exc:
            raise BadRequest(f"{where}: not a valid RE2 regex {value[:80]!r}: {regex_error(exc)}", field=where) from None
    return Matcher(name, op, value)


def parse_all(texts, where: str = "matchers") -> list[Matcher]:
    if not isinstance(texts, list) or not texts:
        raise BadRequest(f'{where}: a non-empty list of matchers like ["service=\\"email\\""]', field=where)
    if len(texts) > MATCHERS_MAX:
        raise BadRequest(f"{where}: at most {MATCHERS_MAX} matchers", field=where)
    matchers = [parse(t, where) for t in texts]
    if all(m.matches({}) for m in matchers):
        # AlertManager refuses a silence that matches every alert; so do we.
        raise BadRequest(f"{where}: at least one matcher must not match the empty label set "
                         "(these would match every alert)", field=where)
    return matchers


def match_all(matchers: list[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)
