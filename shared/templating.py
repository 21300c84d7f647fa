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


def promql_string(value: str, quote: str = '"') -> str:
    """Safe inside a PromQL string opened by ``quote`` (double or single):
    the value's backslashes and that quote are escaped, and its control
    characters are written as escapes, because the PromQL lexer ends a
    string at a raw newline. A lone surrogate has no escape PromQL accepts
    (it is not a Unicode code point), so it is refused."""
    out = []
    for c in value:
        if c == "\\" or c == quote:
            out.append("\\" + c)
        elif c in _CONTROL_ESCAPES:
            out.append(_CONTROL_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        elif "\ud800" <= c <= "\udfff":
            raise TemplateError(f"a value with a lone surrogate (U+{ord(c):04X}) cannot be put in a PromQL string")
        else:
            out.append(c)
    return "".join(out)


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# The characters RE2 (the syntax of Prometheus' regex matchers, Go's regexp)
# gives a meaning to: exactly the set Go's regexp.QuoteMeta escapes. Python's
# re.escape follows Python's rules (which changed in 3.7), not RE2's.
_RE2_META = frozenset("\\.+*?()|[]{}^$")


def re2_literal(value: str) -> str:
    """A regex that matches ``value`` and nothing else (Prometheus anchors it)."""
    return "".join("\\" + c if c in _RE2_META else c for c in value)


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


def check_promql(template: str) -> None:
    """Refuse a PromQL template whose placeholders could change the query's
    structure: every placeholder must sit inside a quoted string (where
    render_promql makes its value a literal), and every string must close.

    A placeholder outside a string (``> {{ labels.threshold }}``, a label
    name, a range ``[{{ window }}]``, a comment) would put a label value,
    which whoever sends the alert chooses, into the query as PromQL itself:
    ``1) or vector(1`` turns any probe into one that always answers.
    Quoting it instead would only move the failure to every incident's run
    (a string where PromQL wants a number or a duration is an error there),
    so such a template is refused when it is loaded, naming the placeholder."""
    for match in PLACEHOLDER.finditer(template):
        if _string_around(template, match.start())[0] is None:
            raise TemplateError(
                f"{{{{ {match.group(1)} }}}} is outside a quoted string; a label value may only be put "
                'in a matcher\'s string (label="{{ name }}" or label=~"{{ name }}.*")'
            )
    if _string_around(template, len(template))[0] is not None:
        raise TemplateError("a quoted string is not closed")


def render_promql(template: str, context: Mapping[str, Any]) -> str:
    """A PromQL template with its placeholders filled in as literals: inside
    a regex matcher (`pod=~"{{ deployment }}-.*"`) a value's RE2
    metacharacters are escaped first, so a deployment named `web.v2` or a
    label `x|.*` matches itself, not every pod of the namespace; then the
    value is escaped for the string it sits in (double, single or back
    quotes), so no value can end that string. A template check_promql
    refuses is refused here too, whatever the values."""
    check_promql(template)

    def fill(match: re.Match) -> str:
        value = str(lookup(context, match.group(1)))
        quote, regex = _string_around(template, match.start())
        if regex:
            value = re2_literal(value)
        if quote == "`":
            # Go drops carriage returns from raw strings: the value would change.
            if "`" in value or "\r" in value:
                raise TemplateError(f"{{{{ {match.group(1)} }}}}: a value with a backquote or a carriage return "
                                    "cannot be put in a raw string")
            return value
        return promql_string(value, quote)

    return PLACEHOLDER.sub(fill, template)


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)
