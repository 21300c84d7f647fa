"""probes.yaml (or the file ``DIAGNOSTICS_FILE`` names): read and checked at
the function's start with PyYAML alone, so that a wrong file stops it
before it takes any event; the collector (concurrent reads, the
kubernetes client, the causes) is built by the first event."""

from __future__ import annotations

from pathlib import Path

import yaml

from functions.diagnostics.facts import Limits
from shared.templating import TemplateError, check_promql

DEFAULT_PROBES_FILE = Path(__file__).with_name("probes.yaml")

# libyaml's safe loader (PyYAML's wheels include it): the pure-Python one
# took most of the start's check of this file.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ProbeConfigError(ValueError):
    pass


def load_probes(path: str = "") -> dict:
    source = Path(path) if path else DEFAULT_PROBES_FILE
    try:
        spec = yaml.load(source.read_text(), Loader=SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProbeConfigError(f"{source}: cannot read probes: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("defaults", {}), dict) or not isinstance(spec.get("services", {}), dict):
        raise ProbeConfigError(f"{source}: expected mappings 'defaults' and 'services'")
    if not isinstance(spec.get("diagnosis") or {}, dict):
        raise ProbeConfigError(f"{source}: 'diagnosis' must be a mapping of bounds")
    try:
        Limits.from_spec(spec.get("diagnosis"))
    except ValueError as exc:
        raise ProbeConfigError(f"{source}: {exc}") from None
    for section in ("metrics", "dependencies"):
        for scope, body in [("defaults", spec.get("defaults", {}))] + [(f"services.{k}", v) for k, v in spec.get("services", {}).items()]:
            queries = (body or {}).get(section, {})
            if not isinstance(queries, dict) or not all(isinstance(q, str) for q in queries.values()):
                raise ProbeConfigError(f"{source}: {scope}.{section} must map names to PromQL strings")
            for name, template in queries.items():
                try:
                    check_promql(template)
                except TemplateError as exc:
                    raise ProbeConfigError(f"{source}: {scope}.{section}.{name}: {exc}") from None
    return spec
