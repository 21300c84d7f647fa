"""The playbooks' action parameters, checked at start without pydantic.

The actions' parameter models (actions.py) define what a parameter may be;
importing pydantic and building them cost the remediation's cold start more
than the rest of its own start. ``action_params.json`` describes each model
as data (its fields' types, whether required, their constraints), written
from the models by ``python -m functions.remediation.paramcheck`` and kept
equal to them by a test. :func:`plainly_valid` answers True only for
parameters the models accept (its checks are narrower: an unusual type, a
model with its own validators, a constraint it does not know, are left to
the models); playbooks.py asks the models about everything else, and their
error is the one a person reads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("action_params.json")
_schema: dict = {}


def schema() -> dict:
    if not _schema:
        _schema.update(json.loads(SCHEMA_FILE.read_text()))
    return _schema


def actions() -> set[str]:
    return set(schema())


def plainly_valid(action: str, params: dict, concrete: set[str]) -> bool:
    """True if playbooks.py's pydantic check of ``params`` (the parameters of
    one step of ``action``; ``concrete``: the names of those without a
    placeholder) passes: each concrete value of its field's type, and when
    every value is concrete, the whole model valid."""
    spec = schema().get(action)
    if spec is None:
        return False
    fields = spec["fields"]
    if set(params) - set(fields) or any(f["required"] and name not in params for name, f in fields.items()):
        return False
    if not all(_typed(fields[name]["type"], params[name]) for name in concrete):
        return False
    if len(concrete) < len(params):
        return True
    if not spec["plain"]:
        return False
    return all(fields[name]["constraints"] is not None and _within(fields[name]["constraints"], params[name]) for name in params)


def _typed(kind, value) -> bool:
    if kind is None:
        return False
    if isinstance(kind, list):
        if kind[0] == "optional":
            return value is None or _typed(kind[1], value)
        return kind[0] == "list" and type(value) is list and all(_typed(kind[1], v) for v in value)
    if kind == "str":
        return type(value) is str
    if kind == "int":
        return type(value) is int
    if kind == "float":
        # An int as large as a float holds exactly; no NaN or infinity.
        return (type(value) is int and abs(value) <= 2**53) or (type(value) is float and math.isfinite(value))
    if kind == "dict":
        return type(value) is dict
    return False


def _within(constraints: dict, value: Any) -> bool:
    if value is None:
        return True  # constraints apply to the value of an optional field, not to its absence
    for name, bound in constraints.items():
        if name == "min_length" and not len(value) >= bound:
            return False
        if name == "max_length" and not len(value) <= bound:
            return False
        if name == "ge" and not value >= bound:
            return False
        if name == "gt" and not value > bound:
            return False
        if name == "le" and not value <= bound:
            return False
        if name == "lt" and not value < bound:
            return False
        # pydantic matches with Rust's regex; on ASCII text without a line
        # break Python's finds the same matches for these patterns.
        if name == "pattern" and not (value.isascii() and "\n" not in value and re.search(bound, value)):
            return False
    return True


# --------------------------------------------------------------------------- written from the models


def describe() -> dict:
    """action_params.json's content, from the actions' models."""
    from functions.remediation.actions import REGISTRY

    described = {}
    for name, spec in sorted(REGISTRY.items()):
        model = spec.params
        hooks = model.__pydantic_decorators__
        own_checks = any((hooks.validators, hooks.field_validators, hooks.root_validators, hooks.model_validators,
                          hooks.field_serializers, hooks.model_serializers))
        described[name] = {
            # The whole model may be judged here: no validator of its own, no configuration but extra="forbid".
            "plain": not own_checks and dict(model.model_config) == {"extra": "forbid"},
            "fields": {field: {"type": _kind(info.annotation), "required": info.is_required(),
                               "constraints": _constraints(info.metadata)} for field, info in model.model_fields.items()},
        }
    return described


def _kind(annotation) -> Any:
    import types
    import typing

    simple = {str: "str", int: "int", float: "float", dict: "dict"}
    if annotation in simple:
        return simple[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1:
        inner = _kind(args[0])
        return ["list", inner] if inner is not None else None
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _kind(next(a for a in args if a is not type(None)))
        return ["optional", inner] if inner is not None else None
    return None


def _constraints(metadata: list) -> dict | None:
    """The constraints of a field, or None when one is not understood here."""
    import annotated_types

    found: dict = {}
    for item in metadata:
        if isinstance(item, annotated_types.MinLen):
            found["min_length"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            found["max_length"] = item.max_length
        elif isinstance(item, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)):
            name = type(item).__name__.lower()
            found[name] = getattr(item, name)
        elif type(item).__name__ == "_PydanticGeneralMetadata" and set(vars(item)) == {"pattern"} and isinstance(item.pattern, str):
            found["pattern"] = item.pattern
        else:
            return None
    return found


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json.dumps(describe(), indent=2) + "\n")
