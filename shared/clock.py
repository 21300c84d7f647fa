"""The time noise control reasons with (flap windows, maintenance windows,
heartbeat timeouts), as naive UTC like every stored time.

One function every caller goes through, so a test can set the time and
move it forward instead of sleeping through ten minutes of a flap window.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_fixed: datetime | None = None


def now() -> datetime:
    if _fixed is not None:
        return _fixed
    return datetime.now(timezone.utc).replace(tzinfo=None)


def set_now(value: datetime | None) -> None:
    """Freeze the clock at ``value`` (naive UTC); None returns to real time."""
    global _fixed
    _fixed = value


def advance(seconds: float) -> datetime:
    """Move a frozen clock forward (freezing it at the real time first)."""
    set_now(now() + timedelta(seconds=seconds))
    return now()
