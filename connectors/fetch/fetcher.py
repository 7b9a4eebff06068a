"""Fetch what notifications lacked: a gap notice in, the record read from the vendor, a snapshot event out.

The requests are the connectors' gap notices: a ``dead_letter`` with stage ``gap`` on
``deadletter.ingest.<source>`` (declared in concord/contracts/topics.py), written and acknowledged before the
webhook was answered, holding the notification's original bytes. For each one the fetcher

1. maps the original bytes again through the connector, which says what to read (entity type, ids);
2. reads each record through the vendor's API (``readers``), retrying 429s (after ``Retry-After``), 5xx and
   timeouts with capped backoff;
3. maps the notification with the record attached through the same connector, as a ``snapshot`` event
   with the notification's own ``seq`` (so it sorts with that entity's other events) and event id (so a
   redelivered notice is the same event);
4. on a permanent failure (401/403, 404, a record the connector cannot map) publishes a dead letter with
   stage ``fetch`` and the original bytes, and a ``fetch_failed`` exception to the owner of that data;
5. commits the notice's offset only after the broker acknowledged what it produced. A fetcher killed
   mid-request has committed nothing, so the notice is fetched again when it restarts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from concord.contracts.codec import Codec
from concord.contracts.topics import SOURCE_OF, Deployment, deadletter_topic
from concord.domain.ids import stable_id
from concord.domain.routing import Routing, load_routing
from concord.exceptions import ConcordError
from connectors.fetch.readers import PermanentReadError, TransientReadError
from connectors.inbound import common as c
from connectors.inbound import hubspot, jobber, salesforce, stripe_events
from connectors.inbound.ingest import Batch, DeadLetter, Publisher
from connectors.outbound.consumer import RetryPolicy

SOURCES = ("stripe", "hubspot", "jobber", "salesforce")  # the notices this fetcher answers
REASON = "fetch_failed"


class Reader(Protocol):
    """A vendor API reader (connectors/fetch/readers.py)."""

    vendor: str

    def read(self, entity_type: str, entity_id: str, change_type: str = "") -> dict[str, Any]: ...


class FetchStalled(ConcordError):
    """Transient failures outlasted the retry policy, or the fetcher was stopped: the notice is not committed."""


@dataclass
class Notice:
    """One fetch request: the gap notice's original bytes and where it was read from."""

    source: str
    raw: bytes
    key: bytes | None
    topic: str = ""
    partition: int = -1
    offset: int = -1


@dataclass
class Fetched:
    """What one notice came to: snapshot events, or a dead letter and an exception for its owner."""

    notice: Notice
    batch: Batch
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0


def _dumps(record: dict[str, Any]) -> bytes:
    """The record as the API returned it, as JSON (the stripe library hands decimals as Decimal)."""
    return json.dumps(record, default=str).encode()


def _snapshot(mapped: c.Outcome) -> list[c.Mapped]:
    """The mapped events of a fetched record, marked as full-record snapshots."""
    out = []
    for m in mapped.events:
        if m.event["op"] != "delete":
            m.event["op"] = "snapshot"
            m.event["changed_fields"] = []
        c.check(m.event)
        out.append(m)
    return out


def _stripe_event(notice: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """A thin event with its object: the snapshot event Stripe would have sent."""
    created = c.to_ms(notice.get("created"), "created")
    return {"id": notice["id"], "object": "event", "type": str(notice.get("type") or "").removeprefix("v1."),
            "created": (created or 0) // 1000, "data": {"object": obj}, "request": {"idempotency_key": None}}


def _jobber_body(body: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """A webhook body with the job attached, as a relay that fetched it would post it."""
    doc = json.loads(json.dumps(body))
    hook = (doc.get("data") or {}).get("webHookEvent") if isinstance(doc.get("data"), dict) else None
    if hook is not None:
        hook["job"] = job
    else:
        doc.setdefault("data", {})["job"] = job
    return doc


class Fetcher:
    """Turns notices into snapshot events (or dead letters and exceptions); no broker here."""

    def __init__(self, readers: dict[str, Reader], ctx: c.Context, retry: RetryPolicy | None = None,
                 routing: Routing | None = None, wait: Callable[[float], bool] | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        self.readers = readers
        self.ctx = ctx
        self.retry = retry or RetryPolicy()
        self.routing = routing or load_routing()
        self.stop = threading.Event()
        self.wait = wait if wait is not None else self.stop.wait  # True when stopped while waiting
        self.clock = clock or c.now_ms

    def _read(self, reader: Reader, entity_type: str, entity_id: str, change_type: str) -> tuple[dict[str, Any], int]:
        return self._retrying(reader, f"{entity_type} {entity_id}",
                              lambda: reader.read(entity_type, entity_id, change_type))

    def _retrying(self, reader: Reader, what: str, call: Callable[[], Any]) -> tuple[Any, int]:
        attempt = 0
        while True:
            attempt += 1
            if self.stop.is_set():
                raise FetchStalled(f"stopped before reading {what}")
            try:
                return call(), attempt
            except TransientReadError as exc:
                if attempt >= self.retry.attempts:
                    raise FetchStalled(f"{reader.vendor} {what}: gave up after {attempt} "
                                       f"attempts, last: {exc}") from None
                if self.wait(self.retry.delay(attempt, exc.retry_after)):
                    raise FetchStalled(f"stopped while retrying {what}") from None

    def _resync(self, reader: Reader, doc: dict[str, Any], rr: c.Reread, batch: Batch) -> int:
        """A Salesforce GAP_OVERFLOW: every record of the type modified since the overflow, each as a snapshot."""
        changed_since = getattr(reader, "changed_since", None)
        if rr.since_ms is None or changed_since is None:
            raise PermanentReadError(f"{rr.change_type} asks for a resync of {rr.entity_type} and {reader.vendor} "
                                     "offers no query by modification time")
        fields = salesforce.resync_fields(rr.entity_type, self.ctx)
        records, attempts = self._retrying(reader, f"{rr.entity_type} records modified since {rr.since_ms}",
                                           lambda: changed_since(rr.entity_type, rr.since_ms, fields))
        for record in records:
            rid = str(c.require(record, "Id", what="a queried record's Id"))
            out = salesforce.map_record(salesforce.with_record(doc, rid, salesforce.cdc_fields(record)),
                                        _dumps(record), self.ctx)
            if out.rereads or not out.events:
                raise c.BadInput(f"the resynced {rr.entity_type} {rid} does not map to a record")
            batch.events += _snapshot(out)
        return attempts

    def handle(self, notice: Notice) -> Fetched:
        """Fetch and map one notice; FetchStalled (commit nothing) when the vendor stays unreachable."""
        batch = Batch(notice.source)
        attempts = 0
        try:
            mapper = {"stripe": stripe_events, "hubspot": hubspot, "jobber": jobber,
                      "salesforce": salesforce}.get(notice.source)
            reader = self.readers.get(notice.source)
            if mapper is None or reader is None:
                raise PermanentReadError(f"no fetcher for {notice.source} notices")
            doc = json.loads(notice.raw)
            wanted = mapper.map_record(doc, notice.raw, self.ctx).rereads
            if notice.source == "hubspot":  # one body, several notices: this one is its key's
                wanted = [rr for rr in wanted if notice.key and rr.entity_ids[:1] == [notice.key.decode()]]
            if not wanted:
                raise c.BadInput("the notice names no record to fetch")
            for rr in wanted:
                if not rr.entity_ids:  # GAP_OVERFLOW: the request is for a resync of the type, not for one id
                    attempts += self._resync(reader, doc, rr, batch)
                    continue
                for entity_id in rr.entity_ids:
                    if notice.source == "salesforce" and rr.change_type == "GAP_DELETE":  # nothing left to read
                        out = salesforce.map_record(salesforce.with_record(doc, entity_id, None), notice.raw, self.ctx)
                        batch.events += _snapshot(out)
                        continue
                    record, tries = self._read(reader, rr.entity_type, entity_id, rr.change_type)
                    attempts += tries
                    if notice.source == "salesforce":
                        fields = salesforce.cdc_fields(record)
                        out = salesforce.map_record(salesforce.with_record(doc, entity_id, fields), _dumps(record),
                                                    self.ctx)
                    elif notice.source == "stripe":
                        native = _stripe_event(doc, record)
                        out = stripe_events.map_record(native, _dumps(record), self.ctx)
                    elif notice.source == "hubspot":
                        # the record as of its last modification: it sorts after every change up to then
                        updated = c.to_ms(record.get("updatedAt"), "updatedAt")
                        seq = max(rr.seq or 0, updated * 1000 + 999 if updated else 0)
                        out = c.Outcome(events=[hubspot.snapshot(rr.entity_type, record, seq,
                                                                 rr.dedupe_key, _dumps(record), self.ctx)])
                    else:
                        out = jobber.map_record(_jobber_body(doc, record), _dumps(record), self.ctx)
                    if out.rereads or not out.events:
                        raise c.BadInput(f"the fetched {rr.entity_type} {entity_id} still does not map to a record")
                    batch.events += _snapshot(out)
        except (PermanentReadError, c.BadInput, ValueError) as exc:
            return self._failed(notice, exc, attempts)
        return Fetched(notice, batch, attempts=attempts)

    def _failed(self, notice: Notice, exc: Exception, attempts: int) -> Fetched:
        now = self.clock()
        what = notice.key.decode(errors="replace") if notice.key else "the notice"
        entity = {"jobber": "job", "hubspot": _hubspot_entity(notice),
                  "salesforce": _salesforce_entity(notice)}.get(notice.source) or _stripe_entity(notice.raw)
        error = f"could not fetch {entity} {what} from {notice.source}: {exc}"
        batch = Batch(notice.source)
        batch.deadletters.append(DeadLetter(notice.key, {
            "original_topic": f"ingest.{notice.source}", "original_partition": notice.partition,
            "original_offset": notice.offset, "original_key": notice.key, "original_value": notice.raw,
            "stage": "fetch", "error_type": type(exc).__name__, "error": error, "failed_at": now}, what))
        system = SOURCE_OF.get(entity, "billing")
        draft: dict[str, Any] = {"exception_id": stable_id(REASON, notice.source, notice.raw.decode(errors="replace")),
                 "reason_code": REASON, "trace_id": c.trace_id_for(f"fetch:{notice.source}:{what}"),
                 "source_system": system, "entity_type": entity, "entity_id": what, "customer_id": None,
                 "message": error + "; the record must be re-read by hand or the notice discarded",
                 "suggestions": [], "attempts": max(1, attempts)}
        rec = self.routing.route(draft, now)
        rec["owner"] = self.routing.gap_owner_by_system.get(system, rec["owner"])  # the data's owner
        rec["original"] = {"topic": notice.topic, "partition": notice.partition, "offset": notice.offset,
                           "key": notice.key, "value": notice.raw}
        return Fetched(notice, batch, [rec], attempts)


def _hubspot_entity(notice: Notice) -> str:
    if notice.source != "hubspot":
        return ""
    try:
        body = json.loads(notice.raw)
    except ValueError:
        return "deal"
    for e in body if isinstance(body, list) else [body]:
        if isinstance(e, dict) and notice.key and str(e.get("objectId")) == notice.key.decode():
            obj = str(e.get("subscriptionType", "")).partition(".")[0]
            if obj == "object":
                obj = hubspot.OBJECT_TYPE_IDS.get(str(e.get("objectTypeId")), "")
            return hubspot.OBJECTS.get(obj, "deal")
    return "deal"


def _salesforce_entity(notice: Notice) -> str:
    if notice.source != "salesforce":
        return ""
    return "deal" if b"OpportunityChangeEvent" in notice.raw or b'"Opportunity"' in notice.raw else "customer"


def _stripe_entity(raw: bytes) -> str:
    try:
        rtype = (json.loads(raw).get("related_object") or {}).get("type")
    except (ValueError, AttributeError):
        return "invoice"
    return stripe_events.THIN_TYPES.get(str(rtype), "invoice")


@dataclass
class RunSummary:
    """What a run of the fetcher did."""

    fetched: int = 0
    failed: int = 0
    skipped: int = 0


def run(bootstrap: str, fetcher: Fetcher, names: Deployment, sources: tuple[str, ...] = SOURCES,
        group: str = "concord-fetcher", concurrency: int = 8, idle_exit_s: float | None = None,
        log: Callable[[str], None] = print) -> RunSummary:
    """Consume gap notices of ``sources`` until stopped (or idle for ``idle_exit_s``); commit after publishing.

    A notice that cannot be fetched raises its exception on the queue of the deployment ``names``.
    """
    from confluent_kafka import Consumer

    codec = Codec()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 10000,
                         "fetch.wait.max.ms": 200})
    consumer.subscribe([deadletter_topic(f"ingest.{s}") for s in sources])
    publisher = Publisher(bootstrap)
    summary = RunSummary()
    idle_since = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            while not fetcher.stop.is_set():
                msgs = [m for m in consumer.consume(num_messages=max(1, concurrency) * 4, timeout=0.5)
                        if not m.error()]
                if not msgs:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
                notices = []
                for m in msgs:
                    headers = dict(m.headers() or [])
                    if headers.get("concord-stage") != b"gap":
                        summary.skipped += 1  # a normalize dead letter: for a person, not for the fetcher
                        continue
                    _, dl = codec.decode(m.value())
                    topic = str(m.topic())
                    notices.append(Notice(topic.removeprefix("deadletter.ingest."), dl["original_value"], m.key(),
                                          topic, m.partition() or 0, m.offset() or 0))
                results = list(pool.map(fetcher.handle, notices))  # in notice order, whatever finished first
                if fetcher.stop.is_set():
                    break  # stopped mid-batch: publish and commit nothing, the notices come back
                for r in results:
                    publish_fetched(publisher, r, names, codec)
                    if r.exceptions:
                        summary.failed += 1
                        log(f"concord fetch: {r.batch.deadletters[0].record['error']}")
                    else:
                        summary.fetched += 1
                consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        publisher.close()
    return summary


def publish_fetched(publisher: Publisher, result: Fetched, names: Deployment,
                    codec: Codec | None = None) -> list[tuple[str, int, int]]:
    """Publish what one notice came to (snapshots, or its dead letter and exception); where the batch landed.

    An exception goes to the queue of the deployment ``names``.
    """
    landed = publisher.publish(result.batch)
    for rec in result.exceptions:
        _publish_exception(publisher, codec or publisher.codec, rec, names.exceptions(rec["owner"]))
    return landed


def _publish_exception(publisher: Publisher, codec: Codec, rec: dict[str, Any], topic: str) -> None:
    from connectors.inbound.ingest import PublishError

    errors: list[Any] = []
    publisher.producer.produce(topic, key=rec["exception_id"].encode(), value=codec.encode("exception", rec, topic),
                               on_delivery=lambda err, _m: errors.append(err) if err else None)
    if publisher.producer.flush(publisher.timeout_s) or errors:
        raise PublishError(f"the {REASON} exception {rec['exception_id']} was not acknowledged")
