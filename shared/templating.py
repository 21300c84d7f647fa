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


def placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)
