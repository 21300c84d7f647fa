"""What a source declares next to its parse function."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from shared.alerts import Parsed
from shared.config import Settings
from shared.models import SOURCE_MAX

# Stored as text in incidents.source (no enum: a new source needs no migration).
NAME_RULE = re.compile(rf"[a-z][a-z0-9_]{{0,{SOURCE_MAX - 1}}}")
WEBHOOK = "webhook"  # a JSON body on POST, bearer token, the grouped answer
CLOUDEVENT = "cloudevent"  # a CloudEvent from the Broker (binary or structured)


@dataclass(frozen=True)
class Source:
    """One alert source: a pure ``parse(payload, settings) -> Parsed`` and
    how the intake serves it.

    ``group_commit``: concurrent payloads of this source share transactions
    (functions/intake/batching.py); worth it for senders that post groups
    often. ``max_body_bytes``: None takes ``MAX_BODY_BYTES``."""

    name: str
    parse: Callable[[Any, Settings], Parsed]
    routes: tuple[str, ...]
    transport: str = WEBHOOK
    group_commit: bool = False
    max_body_bytes: int | None = None

    def __post_init__(self) -> None:
        if not NAME_RULE.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r} must match {NAME_RULE.pattern}")
        if self.transport not in (WEBHOOK, CLOUDEVENT):
            raise ValueError(f"source {self.name}: unknown transport {self.transport!r}")
        if not self.routes or not all(route.startswith("/") for route in self.routes):
            raise ValueError(f"source {self.name}: routes must be absolute paths")

    def body_limit(self, config: Settings) -> int:
        return self.max_body_bytes if self.max_body_bytes is not None else config.max_body_bytes
