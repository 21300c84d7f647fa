"""Label matchers in AlertManager's syntax: ``name="value"``, ``name!="value"``,
``name=~"regex"``, ``name!~"regex"``.

As in AlertManager, a regex is anchored at both ends (``=~"db.*"`` does not
match ``mydb``), and a label that is absent has the value ``""`` (so
``team!="ops"`` matches an alert without a team label). Python's ``re`` stands
in for Go's RE2; patterns RE2 refuses (back-references, look-arounds) are
refused here too, so a window never means something AlertManager would not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from shared.errors import BadRequest

OPERATORS = ("=~", "!~", "!=", "=")
NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))\s*$')
# Constructs RE2 does not have: back-references and look-arounds.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?[=!<]|\(\?P=")
MATCHERS_MAX = 20
VALUE_MAX = 1000


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
            hit = re.fullmatch(self.value, actual, re.DOTALL) is not None
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
            re.compile(value)
        except re.error as exc:
            raise BadRequest(f"{where}: not a valid regex {value[:80]!r}: {exc}", field=where) from None
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
