"""``{{ name }}`` and ``{{ labels.<name> }}`` placeholders in configuration
(PromQL templates, playbook parameters). Deliberately tiny: no logic, no
code execution, unknown names are an error naming the placeholder."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.\-/]*)\s*\}\}")


class TemplateError(ValueError):
    pass


def lookup(context: Mapping[str, Any], path: str) -> Any:
    value: Any = context
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise TemplateError(f"unknown placeholder {{{{ {path} }}}}")
        value = value[part]
    return value


def render(template: str, context: Mapping[str, Any], escape: Callable[[str], str] = str) -> str:
    return PLACEHOLDER.sub(lambda m: escape(str(lookup(context, m.group(1)))), template)


def promql_string(value: str) -> str:
    """Safe inside a double-quoted PromQL label matcher."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_QUOTES = "\"'`"


def _string_around(template: str, position: int) -> tuple[str | None, bool]:
    """The quote of the PromQL string ``position`` lies in (None outside
    any), and whether that string is a regex matcher's (``=~`` / ``!~``).
    Double- and single-quoted strings take backslash escapes; backquoted
    (raw) ones do not; a ``#`` outside a string starts a comment."""
    quote, opened, i = None, 0, 0
    while i < position:
        c = template[i]
        if quote is None:
            if c == "#":
                # A comment runs to the end of its line; its quotes open nothing.
                end = template.find("\n", i)
                i = position if end < 0 else end
                continue
            if c in _QUOTES:
                quote, opened = c, i
        elif c == "\\" and quote != "`":
            i += 1
        elif c == quote:
            quote = None
        i += 1
    regex = quote is not None and re.search(r"[=!]~\s*$", template[:opened]) is not None
    return quote, regex


def render_promql(template: str, context: Mapping[str, Any]) -> str:
    """A PromQL template with its placeholders filled in as literals: inside
    a regex matcher (`pod=~"{{ deployment }}-.*"`) a value's regex
    metacharacters are escaped first, so a deployment named `web.v2` or a
    label `x|.*` matches itself, not every pod of the namespace; then the
    value is escaped for the string it sits in (double, single or back
    quotes), so no value can end that string."""
    def fill(match: re.Match) -> str:
        value = str(lookup(context, match.group(1)))
        quote, regex = _string_around(template, match.start())
        if regex:
            value = re.escape(value)
        if quote == "`":
            if "`" in value:
                raise TemplateError(f"{{{{ {match.group(1)} }}}}: a value with a backquote cannot be put in a raw string")
            return value
        if quote == "'":
            return value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        return promql_string(value)

    return PLACEHOLDER.sub(fill, template)


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)
