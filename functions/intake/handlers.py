"""The intake's handlers: one thin route per alert source (the sources and
their parse functions are in functions/intake/sources/) over one store path,
deduplicated incidents out. Nothing is answered 2xx before it is committed."""

from __future__ import annotations

import logging
from typing import Sequence

from flask import Request, Response
from sqlalchemy.exc import SQLAlchemyError

from functions.intake.batching import GroupCommit
from shared import backlog, content_coding, db, eventio, events, incidents, noise, reconcile, retention
from functions.intake.sources import CLOUDEVENT, REGISTRY, Source
from shared.alerts import Alert, InvalidPayload, Parsed, Rejected
from shared.config import Settings
from shared.correlation import replay
from shared.correlation.plan import Correlator
from shared.errors import BadRequest, SchemaBehind, ServiceUnavailable
from shared.http import TOO_DEEP, Route, check_bearer, parse_json_body, read_body, storable_text
from shared.publisher import Publisher

log = logging.getLogger("intake")

PING_EVENT_TYPE = "dev.knative.sources.ping"
# Transactions of one source's group commit in flight at once. Two: while
# one batch waits for PostgreSQL (its round trips, its commit), the next is
# written, so a request arriving during a transaction no longer waits for
# it to end and then for its own. Two writers halve the batches and cost
# about 10% more CPU per webhook, which is why one writer was kept while
# threads took turns every 5 ms: a writer whose answer had arrived then
# waited for the interpreter behind the other writer's work. With the
# 1 ms turns of shared/serve.py, measured with wrk against one writer in
# the same run (4 rounds of 6 s): at 8 connections p99 27.5 ms instead of
# 43 ms at 0.92x the throughput; at 32 connections 633 webhooks a second
# instead of 450 and p99 72 ms instead of 187 ms. Three writers were no
# better than two and cost more CPU. Two batches never deadlock: every
# writer takes its locks in one global order (noise control's rows by
# fingerprint, then the correlation keys, then incidents in id order, in one
# statement, before any incident is written; docs/correlation.md, "Lock
# order"), as replicas' batches do. A flapping alert's incident touched
# before the keys broke it (tests/test_flapping_locks.py).
WRITE_CONCURRENCY = 2


class Intake:
    def __init__(self, config: Settings, publisher: Publisher, sources: dict[str, Source] = REGISTRY,
                 correlator: Correlator | None = None):
        self.config = config
        self.correlator = correlator
        self.publisher = publisher
        self.sources = sources
        # Concurrent payloads of a batching source share transactions (batching.py).
        self.batches = {
            name: GroupCommit(lambda alerts, actor=name: self._write(alerts, actor, fetch=False), writers=WRITE_CONCURRENCY)
            for name, source in sources.items() if source.group_commit
        }

    def routes(self) -> list[Route]:
        """A route per path each source declares; a CloudEvent route applies
        EVENTS_REQUIRE_TOKEN itself (the Broker sends no token by default)."""
        routes = []
        for source in self.sources.values():
            for path in source.routes:
                if source.transport == CLOUDEVENT:
                    routes.append(Route("POST", path, lambda r, s=source: self.cloudevent(r, s), auth=False))
                else:
                    routes.append(Route("POST", path, lambda r, s=source: self.webhook(r, s)))
        return routes

    def _write(self, alerts: Sequence[Alert], actor: str, fetch: bool = True) -> incidents.RecordResult:
        # Topology is read before the transaction: no Kubernetes call ever
        # holds a connection, and alerts no rule concerns cost nothing here.
        # In a group commit (fetch=False) each request looked its own up
        # before joining (store), so the writers plan from the cache.
        plan = self.correlator.plan(alerts, fetch=fetch) if self.correlator is not None and self.correlator.active else None
        with db.transaction() as conn:
            return self._record_swept(conn, alerts, actor, plan)

    def _record_swept(self, conn, alerts: Sequence[Alert], actor: str, plan=None) -> incidents.RecordResult:
        if plan is None and self.correlator is not None and self.correlator.active:
            # A replay of the noise-control sweep (a held alert released, a
            # silent pipeline) is correlated like a fresh alert; inside the
            # sweep's transaction, topology only from what sweep() looked up.
            plan = self.correlator.plan(alerts, fetch=False)
        return incidents.record_alerts(conn, alerts, self.config.event_source, actor, self.config.reopen_window_seconds,
                                       config=self.config, plan=plan)

    def store(self, alerts: Sequence[Alert], source: Source, actor: str, context: dict) -> incidents.RecordResult:
        """Through the source's group commit (whose actor is the source's
        name) or a transaction of its own."""
        stray = {a.source for a in alerts} - {source.name}
        if stray:
            # incidents.source is free text: only registered names reach it.
            raise ValueError(f"source {source.name} produced alerts of {sorted(stray)}")
        batch = self.batches.get(source.name)
        if batch is not None and self.correlator is not None and self.correlator.active:
            # Each request's own thread waits for its topology (cached for
            # the writer), so a slow Kubernetes API delays only the alerts
            # that need it, never every other webhook queued behind the writers.
            self.correlator.plan(alerts)
        try:
            result = batch.submit(alerts) if batch is not None else self._write(alerts, actor)
        except SQLAlchemyError as exc:
            reason = db.retry_reason(exc)
            # A bound of the transaction (shared/db.py Bounds) that ran out: a lock held elsewhere (a
            # migration, another replica's transaction) or a runaway statement. Every request of the
            # batch gets it (batching.py: a transient error is not retried request by request).
            bound = db.bound_reached(exc)
            log.error(
                f"Error creating incident: database {db.bound_described(exc)} reached, rolled back" if bound else "Error creating incident",
                extra={**context, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "transient": reason is not None,
                       **({"bound": bound} if bound else {})},
            )
            if reason == db.SCHEMA_BEHIND:
                raise SchemaBehind("the database schema is older than this code: run the migrations; "
                                   "the alerts were not stored, retry") from None
            if bound is not None:
                raise ServiceUnavailable(f"the database did not answer within this request's {db.bound_described(exc)}; "
                                         "the alerts were not stored, retry", bound=bound) from None
            if reason is not None:
                raise ServiceUnavailable("the database is unavailable; the alerts were not stored, retry") from None
            raise
        for outcome in result.outcomes:
            if outcome.action == "ignored":
                log.info("Alert ignored", extra={**context, "fingerprint": outcome.fingerprint, "reason": outcome.reason})
            elif outcome.action in ("created", "resolved", "reopened", "joined"):
                log.info(f"Incident {outcome.action}", extra={**context, "incident_id": outcome.incident_id, "fingerprint": outcome.fingerprint})
        self.publisher.submit(result.event_ids)
        return result

    def webhook(self, request: Request, source: Source) -> dict:
        payload = parse_json_body(request, source.body_limit(self.config), webhook=True)
        try:
            hook = source.parse(payload, self.config)
        except InvalidPayload as exc:
            if "rejected" in exc.details:
                self._log_rejected(exc.details["rejected"], {"source": source.name, "alerts": len(exc.details["rejected"])})
            raise
        context = {"source": source.name, "receiver": hook.receiver, "group_key": hook.group_key, "alerts": len(hook.items)}
        log.info("Received webhook", extra={**context, "status": hook.status})
        if hook.truncated_alerts:
            log.warning(
                "Webhook truncated by the sender's max_alerts",
                extra={**context, "truncated_alerts": hook.truncated_alerts},
            )
        if hook.warnings:
            log.warning("Webhook envelope fields ignored", extra={**context, "warnings": hook.warnings})
        if hook.rejected:
            self._log_rejected([r.as_dict() for r in hook.rejected], context)
        result = self.store(hook.alerts, source, source.name, context)
        return _webhook_answer(hook, result.outcomes)

    @staticmethod
    def _log_rejected(rejected: list[dict], context: dict) -> None:
        """One line per webhook: a storm of bad alerts must not flood the log.
        "Alerts rejected" is the stable phrase to count and alert on."""
        log.warning(
            "Alerts rejected",
            extra={**context, "rejected": len(rejected), "reasons": [f"{r.get('alert_name') or '?'}: {r['reason']}"[:300] for r in rejected[:10]]},
        )

    def cloudevent(self, request: Request, source: Source) -> Response | dict:
        if self.config.events_require_token:
            check_bearer(request, self.config.api_token)
        limit = source.body_limit(self.config)
        body = content_coding.decode(read_body(request, limit), request.headers.get("Content-Encoding"), limit)
        try:
            event = eventio.parse_event(request.headers, body)
        except RecursionError:
            raise BadRequest(f"not a valid CloudEvent: {TOO_DEEP}") from None
        for attribute in ("id", "source", "type"):
            storable_text(str(event[attribute]), attribute)
        event_type = event["type"]
        wants_ack_only = "reply" in request.headers.get("Prefer", "")
        if event_type == PING_EVENT_TYPE:
            summary = self.sweep(request)
            return Response(status=202) if wants_ack_only else summary
        if event_type != events.INCIDENT_REPORT:
            raise BadRequest(f"unsupported event type {event_type!r}; this function accepts {events.INCIDENT_REPORT}")
        parsed = source.parse(event.get_data(), self.config)
        context = {"source": source.name, "event_id": event["id"], "event_source": event["source"], "alerts": len(parsed.items)}
        log.info("Received incident report", extra=context)
        result = self.store(parsed.alerts, source, f"{source.name}:{event['source']}"[:200], context)
        if wants_ack_only:
            return Response(status=202)
        return {"status": "ok", "results": [o.as_dict() for o in result.outcomes]}

    def sweep(self, request: Request) -> dict:
        """Publish what the Broker missed (the PingSource, or POST /outbox/sweep).
        Its transactions have the sweep's bounds (DB_SWEEP_*), not a request's."""
        with db.bounded(db.sweep_bounds(self.config)):
            reconcile.run_safely(db.engine(), self.config)
            if self.correlator is not None and self.correlator.active:
                replay.look_up_topology(db.engine(), self.correlator)
            # Held alerts whose window ended, flapping that settled, silent pipelines.
            self.publisher.submit(noise.sweep(db.engine(), self.config, self._record_swept))
            report = self.publisher.sweep()
            # After publishing, so what was just sent is not waiting behind a delete.
            retention.run_safely(db.engine(), self.config)
            # Dead letters whose redelivery's sender is gone stop showing "sending".
            db.for_the_sweep("Releasing stale dead-letter claims", lambda: backlog.release_stale_claims(
                db.engine(), self.config.publish_timeout_seconds), log)
        summary = {"published": len(report.published), "failed": len(report.failed), "parked": len(report.parked),
                   "pending": report.pending_left}
        log.info("Outbox sweep", extra=summary)
        return summary


def _webhook_answer(hook: Parsed, outcomes: Sequence[incidents.Outcome]) -> dict:
    results = _in_payload_order(hook.items, outcomes)
    counts: dict[str, int] = {}
    for item in results:
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    body = {"status": "ok", "receiver": hook.receiver, "truncated_alerts": hook.truncated_alerts, "counts": counts, "results": results}
    if hook.warnings:
        body["warnings"] = hook.warnings
    return body


def _in_payload_order(items: Sequence[Alert | Rejected], outcomes: Sequence[incidents.Outcome]) -> list[dict]:
    """Stored outcomes and rejections merged back into the order of the payload."""
    stored = iter(outcomes)
    return [item.as_dict() if isinstance(item, Rejected) else next(stored).as_dict() for item in items]
