"""A local stand-in for the Knative Broker data plane, wired from the real
``Broker`` and ``Trigger`` manifests under ``knative/``.

A development and test tool, not a production component. It behaves like
the Knative MT channel-based Broker as far as the functions can tell:

- ingress ``POST /<namespace>/<broker>``: binary or structured CloudEvents
  1.0; ``202`` when accepted; ``400`` naming a missing required attribute;
- Trigger filters: ``spec.filter.attributes`` (exact) and ``spec.filters``
  (``exact``, ``prefix``, ``suffix``, ``all``, ``any``, ``not``; ``cesql`` is
  refused at load); when ``filters`` is set, ``filter`` is ignored;
- delivery in binary mode with ``Prefer: reply``, the Trigger's or else the
  Broker's ``delivery`` (``retry``, ``backoffPolicy``, ``backoffDelay``,
  ``timeout``, which bounds a delivery as a whole, its answer included);
  retries on transport errors, ``404 408 409 429`` and ``5xx``;
- binary-mode attribute headers are percent-decoded on the way in (HTTP
  binding §3.1.3.2), filters see the decoded values, and they are encoded
  again on the way out;
- a ``2xx`` carrying a CloudEvent is a reply and re-enters the Broker; a
  ``2xx`` whose body is not empty and not a valid CloudEvent is a failed
  delivery, retried and dead-lettered with code ``502``, as Knative's
  broker filter answers it;
- after the last attempt, or on a failure that is not retried, the event goes
  to the ``deadLetterSink`` with ``knativeerrordest``, ``knativeerrorcode`` and
  ``knativeerrordata`` (the response body, truncated, base64);
- no ordering is promised.

``duplicates`` delivers every event that many times, to prove handlers
idempotent. ``backoff_scale`` multiplies every retry's pause, so a test
about something else than timing need not wait out a Trigger's real
minutes of back-off; ``outstanding`` names the deliveries not finished.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import requests
import yaml

from shared import deadline
from shared.eventio import decode_header_value, encode_header_value

log = logging.getLogger("local-broker")

REQUIRED_ATTRIBUTES = ("id", "source", "specversion", "type")
RETRYABLE = {404, 408, 409, 429}
BAD_REPLY_STATUS = 502
ERROR_DATA_LIMIT = 1024


class ManifestError(ValueError):
    pass


# --------------------------------------------------------------------------- durations


def parse_duration(value: str | None, default: float) -> float:
    """ISO 8601 durations as Knative uses them (PT0.2S, PT1M30S, P1D)."""
    if not value:
        return default
    m = re.fullmatch(r"P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?", value)
    if not m or value in ("P", "PT"):
        raise ManifestError(f"not an ISO 8601 duration: {value!r}")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class Delivery:
    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.2
    timeout: float = 30.0
    dead_letter: str | None = None

    def delay(self, retry_number: int) -> float:
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * (2 ** retry_number)


# --------------------------------------------------------------------------- filters


Filter = Callable[[dict], bool]


def _attribute_filter(spec: dict) -> Filter:
    expected = {k: str(v) for k, v in (spec or {}).items()}
    return lambda attrs: all(attrs.get(k) == v for k, v in expected.items())


def compile_filter(spec: dict, where: str) -> Filter:
    """One entry of ``spec.filters`` (the SubscriptionsAPI dialects)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ManifestError(f"{where}: each filter must have exactly one dialect")
    (dialect, body), = spec.items()
    if dialect == "exact":
        return _attribute_filter(body)
    if dialect in ("prefix", "suffix"):
        items = {k: str(v) for k, v in body.items()}
        test = str.startswith if dialect == "prefix" else str.endswith
        return lambda attrs: all(k in attrs and test(str(attrs[k]), v) for k, v in items.items())
    if dialect == "all":
        parts = [compile_filter(f, where) for f in body]
        return lambda attrs: all(p(attrs) for p in parts)
    if dialect == "any":
        parts = [compile_filter(f, where) for f in body]
        return lambda attrs: any(p(attrs) for p in parts)
    if dialect == "not":
        inner = compile_filter(body, where)
        return lambda attrs: not inner(attrs)
    if dialect == "cesql":
        raise ManifestError(f"{where}: the cesql filter dialect is not supported by the local Broker; use exact/prefix/suffix/all/any/not")
    raise ManifestError(f"{where}: unknown filter dialect {dialect!r}")


# --------------------------------------------------------------------------- manifests


@dataclass
class Trigger:
    name: str
    namespace: str
    broker: str
    subscriber: str
    matches: Filter
    delivery: Delivery


@dataclass
class BrokerSpec:
    name: str
    namespace: str
    delivery: Delivery
    triggers: list[Trigger] = field(default_factory=list)


def _documents(directory: Path) -> list[dict]:
    docs = []
    for path in sorted(directory.rglob("*.yaml")):
        if "overlays" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind"):
                doc["_file"] = str(path)
                docs.append(doc)
    return docs


def resolve_destination(dest: dict, services: dict[str, str], where: str) -> str:
    """A Knative Destination (``ref`` to a Service and/or ``uri``) to a URL."""
    if not isinstance(dest, dict):
        raise ManifestError(f"{where}: destination must be a mapping")
    uri = dest.get("uri")
    ref = dest.get("ref")
    if ref:
        name = ref.get("name")
        if name not in services:
            raise ManifestError(f"{where}: no local address for Service {name!r}; known: {', '.join(sorted(services))}")
        base = services[name].rstrip("/")
        return base + (uri if uri and uri.startswith("/") else ("/" + uri if uri else ""))
    if uri and re.match(r"^https?://", uri):
        return uri
    raise ManifestError(f"{where}: needs ref or an absolute uri")


def _delivery(spec: dict | None, services: dict[str, str], where: str, fallback: Delivery | None = None) -> Delivery:
    base = fallback or Delivery()
    if not spec:
        return base
    dls = spec.get("deadLetterSink")
    return Delivery(
        retry=int(spec.get("retry", base.retry)),
        backoff_policy=spec.get("backoffPolicy", base.backoff_policy),
        backoff_delay=parse_duration(spec.get("backoffDelay"), base.backoff_delay),
        timeout=parse_duration(spec.get("timeout"), base.timeout),
        dead_letter=resolve_destination(dls, services, f"{where}: deadLetterSink") if dls else base.dead_letter,
    )


def load_brokers(directory: Path, services: dict[str, str], default_namespace: str = "default") -> dict[tuple[str, str], BrokerSpec]:
    docs = _documents(directory)
    brokers: dict[tuple[str, str], BrokerSpec] = {}
    for doc in docs:
        if doc["kind"] == "Broker":
            meta = doc.get("metadata", {})
            ns = meta.get("namespace", default_namespace)
            where = f"{doc['_file']}: Broker {meta.get('name')}"
            brokers[(ns, meta["name"])] = BrokerSpec(meta["name"], ns, _delivery((doc.get("spec") or {}).get("delivery"), services, where))
    for doc in docs:
        if doc["kind"] != "Trigger":
            continue
        meta, spec = doc.get("metadata", {}), doc.get("spec", {})
        ns = meta.get("namespace", default_namespace)
        where = f"{doc['_file']}: Trigger {meta.get('name')}"
        broker = brokers.get((ns, spec.get("broker")))
        if broker is None:
            raise ManifestError(f"{where}: names Broker {spec.get('broker')!r}, which no manifest defines")
        if spec.get("filters"):
            parts = [compile_filter(f, where) for f in spec["filters"]]
            matches = lambda attrs, parts=parts: all(p(attrs) for p in parts)  # noqa: E731
        else:
            matches = _attribute_filter((spec.get("filter") or {}).get("attributes"))
        broker.triggers.append(Trigger(
            meta["name"], ns, broker.name, resolve_destination(spec.get("subscriber"), services, f"{where}: subscriber"),
            matches, _delivery(spec.get("delivery"), services, where, broker.delivery),
        ))
    return brokers


# --------------------------------------------------------------------------- events


@dataclass
class Event:
    attributes: dict[str, str]
    data: bytes
    content_type: str | None

    def binary(self) -> tuple[dict, bytes]:
        headers = {f"ce-{k}": encode_header_value(v) for k, v in self.attributes.items() if k != "datacontenttype"}
        if self.content_type:
            headers["Content-Type"] = self.content_type
        return headers, self.data


class BrokerStopped(RuntimeError):
    """An event offered once the broker began to stop."""


class BadEvent(ValueError):
    pass


def parse_event(headers: dict[str, str], body: bytes) -> Event:
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "")
    if content_type.startswith("application/cloudevents+json"):
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadEvent("structured CloudEvent is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BadEvent("structured CloudEvent must be a JSON object")
        for name in REQUIRED_ATTRIBUTES:
            if not doc.get(name):
                raise BadEvent(f"missing required attribute {name!r}")
        if "data_base64" in doc:
            data = base64.b64decode(doc.pop("data_base64"))
        elif "data" in doc:
            raw = doc.pop("data")
            data = raw.encode() if isinstance(raw, str) and not str(doc.get("datacontenttype", "")).endswith("json") else json.dumps(raw).encode()
        else:
            data = b""
        attrs = {k: str(v) for k, v in doc.items()}
        return Event(attrs, data, attrs.get("datacontenttype", "application/json"))
    try:
        attrs = {k[3:]: decode_header_value(v) for k, v in lower.items() if k.startswith("ce-")}
    except ValueError as exc:
        raise BadEvent(f"attribute header not decodable: {exc}") from None
    for name in REQUIRED_ATTRIBUTES:
        if not attrs.get(name):
            raise BadEvent(f"missing required attribute {name!r} (header ce-{name})")
    if content_type:
        attrs["datacontenttype"] = content_type
    return Event(attrs, body, content_type or None)


def reply_of(response: requests.Response) -> Event | None:
    """The event a ``2xx`` answer carries, or None for an empty answer.

    As Knative's broker filter: an answer with ``ce-specversion`` or a
    structured CloudEvents media type must be a valid event, and any other
    non-empty body is not an acknowledgement either (``BadEvent``).
    """
    content_type = response.headers.get("Content-Type", "")
    if response.headers.get("ce-specversion") or content_type.startswith("application/cloudevents"):
        if content_type.startswith("application/cloudevents-batch"):
            raise BadEvent("a batch of CloudEvents is not a reply")
        reply = parse_event(dict(response.headers), response.content)
        if reply.attributes.get("specversion") != "1.0":
            raise BadEvent(f"unsupported specversion {reply.attributes.get('specversion')!r}")
        return reply
    if response.content:
        raise BadEvent("received a non-empty response not recognized as CloudEvent; "
                       "the response must be either empty or a valid CloudEvent")
    return None


# --------------------------------------------------------------------------- the broker


class LocalBroker:
    def __init__(self, brokers: dict[tuple[str, str], BrokerSpec], port: int = 8090, host: str = "127.0.0.1",
                 duplicates: int = 1, workers: int = 32, backoff_scale: float = 1.0):
        self.brokers = brokers
        self.backoff_scale = backoff_scale
        self.port = port
        self.host = host
        self.duplicates = duplicates
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delivery")
        self.http = threading.local()
        self.server: ThreadingHTTPServer | None = None
        self.dead_lettered: list[tuple[str, dict]] = []
        self.delivered: list[tuple[str, str, int]] = []  # (trigger, event id, status)
        self._lock = threading.Lock()
        self._pending = 0
        # What each unfinished delivery is doing, for a test that waits in vain.
        self._outstanding: dict[int, str] = {}
        # Set by stop(): a delivery waiting to retry ends instead of keeping
        # the process alive (the interpreter joins the pool's threads at exit).
        self._stopped = threading.Event()

    @property
    def pending(self) -> int:
        """Deliveries accepted and not finished yet (queued, being sent,
        retried or being dead-lettered); a reply counts before its parent's
        delivery ends, so 0 means the broker is idle. /health reports it."""
        with self._lock:
            return self._pending

    @property
    def outstanding(self) -> list[str]:
        """One line per delivery not finished: its trigger, event and state."""
        with self._lock:
            return sorted(self._outstanding.values())

    def wait_idle(self, timeout: float) -> None:
        """Return once no delivery is pending; after ``timeout`` seconds
        raise TimeoutError naming what each unfinished one is doing."""
        end = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() >= end:
                raise TimeoutError(f"the broker still had {self.pending} deliveries after {timeout:g} s: " + "; ".join(self.outstanding))
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ingress_url(self, namespace: str, broker: str) -> str:
        return f"{self.url}/{namespace}/{broker}"

    def _session(self) -> requests.Session:
        if not hasattr(self.http, "session"):
            self.http.session = deadline.bounded(requests.Session())
        return self.http.session

    def accept(self, namespace: str, broker_name: str, event: Event) -> None:
        """Queue the event's deliveries. Raises :class:`BrokerStopped` once
        :meth:`stop` began (the ingress answers 503, so the sender keeps
        the event and retries): nothing is counted that will not run."""
        broker = self.brokers[(namespace, broker_name)]
        for trigger in broker.triggers:
            if trigger.matches(event.attributes):
                for _ in range(self.duplicates):
                    with self._lock:
                        if self._stopped.is_set():
                            raise BrokerStopped("the broker is stopping")
                        self._pending += 1
                    try:
                        future = self.executor.submit(self._deliver, broker, trigger, event)
                    except RuntimeError:  # shut down between the check and the submit
                        with self._lock:
                            self._pending -= 1
                        raise BrokerStopped("the broker is stopping") from None
                    # A delivery cancelled by stop() never runs _deliver's finally.
                    future.add_done_callback(self._uncount_if_cancelled)

    def _uncount_if_cancelled(self, future) -> None:
        if future.cancelled():
            with self._lock:
                self._pending -= 1

    def _deliver(self, broker: BrokerSpec, trigger: Trigger, event: Event) -> None:
        try:
            self._try_deliver(broker, trigger, event)
        finally:
            with self._lock:
                self._pending -= 1
                self._outstanding.pop(threading.get_ident(), None)

    def _doing(self, trigger: Trigger, event: Event, state: str) -> None:
        with self._lock:
            self._outstanding[threading.get_ident()] = f"{trigger.name} {event.attributes.get('id')}: {state}"

    def _try_deliver(self, broker: BrokerSpec, trigger: Trigger, event: Event) -> None:
        delivery = trigger.delivery
        status, body, error = None, b"", ""
        for attempt in range(delivery.retry + 1):
            if attempt:
                pause = delivery.delay(attempt) * self.backoff_scale
                self._doing(trigger, event, f"retry {attempt} in {pause:g} s after {status or error}")
                if self._stopped.wait(pause):
                    log.warning("Delivery abandoned: the broker stopped", extra={"trigger": trigger.name, "event_id": event.attributes.get("id")})
                    return
            self._doing(trigger, event, f"attempt {attempt + 1} sent")
            headers, data = event.binary()
            headers["Prefer"] = "reply"
            try:
                # The timeout bounds the whole delivery, its answer included,
                # as Knative's does: a subscriber that trickles its answer is
                # one that timed out, not a delivery thread held for good.
                response = deadline.request(self._session(), "POST", trigger.subscriber, delivery.timeout,
                                            headers=headers, data=data)
            except requests.RequestException as exc:
                status, body, error = None, b"", f"{type(exc).__name__}: {exc}"
                continue
            status, body = response.status_code, response.content
            reply = None
            if 200 <= status < 300:
                try:
                    reply = reply_of(response)
                except BadEvent as exc:
                    # Knative's filter answers 502 for this, so the delivery is retried.
                    status, body, error = BAD_REPLY_STATUS, str(exc).encode(), str(exc)
            with self._lock:
                self.delivered.append((trigger.name, event.attributes["id"], status))
            if 200 <= status < 300:
                if reply is not None:
                    self.accept(broker.namespace, broker.name, reply)
                return
            if status not in RETRYABLE and status < 500:
                break
        log.error("Delivery failed", extra={"trigger": trigger.name, "event_id": event.attributes.get("id"), "status": status, "error": error})
        self._doing(trigger, event, "being dead-lettered")
        self._dead_letter(trigger, event, status, body or error.encode())

    def _dead_letter(self, trigger: Trigger, event: Event, status: int | None, body: bytes) -> None:
        sink = trigger.delivery.dead_letter
        attrs = dict(event.attributes)
        attrs["knativeerrordest"] = trigger.subscriber
        attrs["knativeerrorcode"] = str(status or 0)
        attrs["knativeerrordata"] = base64.b64encode(body[:ERROR_DATA_LIMIT]).decode()
        with self._lock:
            self.dead_lettered.append((trigger.name, attrs))
        if not sink:
            log.error("Event dropped: no deadLetterSink", extra={"trigger": trigger.name, "event_id": attrs.get("id")})
            return
        dead = Event(attrs, event.data, event.content_type)
        for attempt in range(3):
            try:
                headers, data = dead.binary()
                r = deadline.request(self._session(), "POST", sink, trigger.delivery.timeout, headers=headers, data=data)
                if r.status_code < 300:
                    return
            except requests.RequestException:
                pass
            if self._stopped.wait(0.2 * (attempt + 1)):
                break
        log.error("Dead-letter sink refused the event", extra={"trigger": trigger.name, "event_id": attrs.get("id")})

    # ------------------------------------------------------------------ HTTP

    def start(self) -> "LocalBroker":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict | None = None):
                payload = json.dumps(body).encode() if body else b""
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path in ("/health", "/healthz"):
                    return self._answer(200, {"status": "healthy", "pending_deliveries": outer.pending})
                return self._answer(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 2 or (parts[0], parts[1]) not in outer.brokers:
                    return self._answer(404, {"error": f"no broker at {self.path}"})
                try:
                    event = parse_event(dict(self.headers), body)
                except BadEvent as exc:
                    return self._answer(400, {"error": str(exc)})
                try:
                    outer.accept(parts[0], parts[1], event)
                except BrokerStopped as exc:
                    return self._answer(503, {"error": str(exc)})
                return self._answer(202)

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((self.host, self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        if self.pending:
            log.warning("Broker stopped with deliveries pending", extra={"pending": self.pending})
        self.executor.shutdown(wait=False, cancel_futures=True)


def parse_services(raw: str) -> dict[str, str]:
    """``intake=8081,query=http://host:8080`` to name -> base URL."""
    services = {}
    for item in filter(None, (i.strip() for i in raw.split(","))):
        name, _, target = item.partition("=")
        services[name] = target if target.startswith("http") else f"http://127.0.0.1:{int(target)}"
    return services


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", default=str(Path(__file__).resolve().parent.parent / "knative" / "base"))
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--namespace", default="default", help="namespace of manifests that do not say")
    parser.add_argument("--services", required=True, help="Knative Service name to local port, e.g. intake=8081,query=8080")
    parser.add_argument("--duplicates", type=int, default=1, help="deliver every event this many times")
    args = parser.parse_args(argv)
    from shared import log as logs

    logs.configure("INFO")
    brokers = load_brokers(Path(args.manifests), parse_services(args.services), args.namespace)
    broker = LocalBroker(brokers, args.port, duplicates=args.duplicates).start()
    for (ns, name), spec in brokers.items():
        log.info("Broker ready", extra={"ingress": broker.ingress_url(ns, name), "triggers": [t.name for t in spec.triggers]})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    broker.stop()


if __name__ == "__main__":
    main()
