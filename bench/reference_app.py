"""The baseline service the intake is compared with: a straightforward Flask +
SQLAlchemy + pg8000 webhook that does one INSERT ... ON CONFLICT per alert in
one transaction per request, served by the same gunicorn configuration."""

import json
import os
import uuid

import sqlalchemy as sa
from flask import Flask, request

app = Flask(__name__)
engine = sa.create_engine(os.environ["DATABASE_URL"], pool_size=8, max_overflow=0, pool_pre_ping=True)
INSERT = sa.text(
    "INSERT INTO incidents (id, alert_name, priority, status, summary, fingerprint, labels, source) "
    "VALUES (:id, :name, 'P0', 'open', :summary, :fp, CAST(:labels AS jsonb), 'alertmanager') "
    "ON CONFLICT (fingerprint) WHERE status IN ('open', 'investigating') DO UPDATE SET updated_at = now() "
    "RETURNING id"
)


@app.post("/webhook/alert")
def webhook():
    payload = request.get_json()
    results = []
    with engine.begin() as conn:
        for alert in payload["alerts"]:
            labels = alert["labels"]
            row = conn.execute(INSERT, {"id": str(uuid.uuid4()), "name": labels["alertname"], "summary": alert.get("annotations", {}).get("summary", ""),
                                        "fp": alert.get("fingerprint") or json.dumps(labels, sort_keys=True)[:128], "labels": json.dumps(labels)}).scalar()
            results.append(row)
    return {"results": results}
