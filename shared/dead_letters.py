"""Dead-lettered events that name no known incident."""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def record(conn: Connection, event_id: str, source: str, event_type: str, destination: str | None, code: str | None,
           error: str | None, attributes: dict, data: str) -> None:
    """Once per event and destination: a redelivered dead letter is not recorded twice."""
    conn.execute(
        sa.text(
            "INSERT INTO dead_letters (event_id, event_source, event_type, error_destination, error_code, error_data, attributes, data) "
            "VALUES (:id, :src, :type, :dest, :code, :err, CAST(:attrs AS jsonb), :data) "
            "ON CONFLICT ON CONSTRAINT uq_dead_letters_event DO NOTHING"
        ),
        {"id": event_id, "src": source, "type": event_type, "dest": destination, "code": code, "err": error,
         "attrs": json.dumps(attributes, default=str), "data": data[:100000]},
    )
