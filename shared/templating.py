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


# An opening regex matcher (`label=~"` or `label!~"`) and, after it, the
# text up to the placeholder: still inside the matcher's string while no
# unescaped quote has closed it.
_REGEX_MATCHER_OPEN = re.compile(r'[=!]~\s*"((?:[^"\\]|\\.)*)$')


def render_promql(template: str, context: Mapping[str, Any]) -> str:
    """A PromQL template with its placeholders filled in as literals: inside
    a regex matcher (`pod=~"{{ deployment }}-.*"`) a value's regex
    metacharacters are escaped first, so a deployment named `web.v2` or a
    label `x|.*` matches itself, not every pod of the namespace; everywhere
    the value is then safe inside the double-quoted string."""
    def fill(match: re.Match) -> str:
        value = str(lookup(context, match.group(1)))
        if _REGEX_MATCHER_OPEN.search(template, 0, match.start()):
            value = re.escape(value)
        return promql_string(value)

    return PLACEHOLDER.sub(fill, template)


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)
