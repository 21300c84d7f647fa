"""The alert sources the intake serves: one module per source, each a pure
``parse(payload, settings) -> Parsed`` and its :class:`Source` declaration.

Adding a source is one module here plus its line below (docs/extending.md).
``incidents.source`` is plain text, so a new name needs no migration; the
names are checked here, once, when the intake starts.
"""

from __future__ import annotations

from functions.intake.sources import alertmanager, cloudevent, grafana
from functions.intake.sources.base import CLOUDEVENT, WEBHOOK, Source

__all__ = ["CLOUDEVENT", "REGISTRY", "WEBHOOK", "Source", "registered"]


def _registry(*sources: Source) -> dict[str, Source]:
    registry: dict[str, Source] = {}
    routes: dict[str, str] = {}
    for source in sources:
        if source.name in registry:
            raise ValueError(f"two sources are named {source.name!r}")
        for route in source.routes:
            if route in routes:
                raise ValueError(f"sources {routes[route]!r} and {source.name!r} both claim {route}")
            routes[route] = source.name
        registry[source.name] = source
    return registry


REGISTRY: dict[str, Source] = _registry(alertmanager.SOURCE, cloudevent.SOURCE, grafana.SOURCE)


def registered(name: str) -> Source:
    """The source of this name; a name outside the registry is a programming
    error (it would be stored in incidents.source)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no alert source named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
