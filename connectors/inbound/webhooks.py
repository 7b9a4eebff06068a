"""``concord webhooks``: an HTTP receiver for vendor webhooks that answers 2xx only once the broker has the data.

``POST /webhooks/{stripe,hubspot,salesforce,jobber}``:

- verifies the request first (401 and nothing published when the signature is missing, wrong or stale):
  Stripe ``Stripe-Signature`` with ``STRIPE_WEBHOOK_SECRET`` (the official library, 300 s tolerance);
  HubSpot ``X-HubSpot-Signature-v3`` with ``HUBSPOT_CLIENT_SECRET`` (5 minute limit; the signed URI is
  ``CONCORD_WEBHOOK_PUBLIC_URL`` + path when set, else the URL the request came to); Jobber
  ``X-Jobber-Hmac-SHA256`` with ``JOBBER_WEBHOOK_SECRET``; Salesforce (a relay posting CDC events)
  ``Authorization: Bearer $SALESFORCE_WEBHOOK_TOKEN``;
- decodes the body only once it is verified; then parses it through the input boundary
  (``connectors/inbound/boundary.py``) and maps it like ``concord ingest``, off the event loop and within
  ``CONCORD_INPUT_PARSE_SECONDS``; a body it cannot use is dead-lettered, then answered 400 (422 when mapping
  took too long) with a JSON body naming what was wrong: input never causes a 5xx;
- answers 200 (with a JSON summary) only after the broker acknowledged every record, duplicates
  included (they are acknowledged without publishing); 503 when the broker did not acknowledge, so
  the vendor retries;
- a body over ``CONCORD_MAX_RECORD_BYTES`` (default 900 KB, under Kafka's default 1 MB message limit) is
  verified, dead-lettered with as much of its bytes as fits plus their sha256 and size, and answered 413;
  a body over ``HARD_CAP`` (16 MB) is not even verified: 413, counted and logged, nothing written;
- rejected requests (401, 413) are logged on ``concord.webhooks`` with the body's sha256 and size, never its
  bytes (an unauthenticated body does not go to Kafka).

``GET /metrics`` serves Prometheus metrics, ``GET /healthz`` answers ok.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from concord.contracts.topics import deadletter_topic
from concord.exceptions import ConfigError
from concord.runtime import metrics
from connectors.inbound import boundary, hubspot, jobber, join_keys, salesforce, stripe_events
from connectors.inbound import common as c
from connectors.inbound.identity import DEFAULT_PATH, IdentityMap
from connectors.inbound.ingest import (
    Batch,
    Deduper,
    Publisher,
    PublishError,
    count,
    dead_letter,
    max_record_bytes,
    normalize,
    oversized,
)

MAPPERS = {"stripe": stripe_events, "hubspot": hubspot, "salesforce": salesforce, "jobber": jobber}
HARD_CAP = 16 * 1024 * 1024  # bodies up to this are read whole (to verify them); larger ones are refused unread
log = logging.getLogger("concord.webhooks")

UNMAPPED = "is not mapped"  # the error the mappers give an event type they do not handle


async def read_capped(request: web.Request, cap: int) -> tuple[bytes, int, str]:
    """The body's first ``cap`` bytes, its full size and its sha256, without holding more than ``cap`` bytes."""
    kept, size, digest = bytearray(), 0, hashlib.sha256()
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        digest.update(chunk)
        if len(kept) < cap:
            kept += chunk[:cap - len(kept)]
    return bytes(kept), size, digest.hexdigest()


def _refused(source: str, request: web.Request, status: int, error: str, size: int, sha256: str) -> None:
    log.warning(json.dumps({"event": "webhook_refused", "source": source, "status": status, "error": error,
                            "remote": request.remote, "size": size, "sha256": sha256}))


class Unauthorized(Exception):
    """The request is not signed by the vendor."""


def verify(source: str, request: web.Request, body: bytes, env: dict[str, str]) -> None:
    """Raise Unauthorized unless ``request`` carries a valid signature for ``source``."""
    h = request.headers
    try:
        if source == "stripe":
            stripe_events.verify(body, h.get("Stripe-Signature"), env.get("STRIPE_WEBHOOK_SECRET"))
        elif source == "hubspot":
            base = env.get("CONCORD_WEBHOOK_PUBLIC_URL")
            uri = base.rstrip("/") + request.path_qs if base else str(request.url)
            hubspot.verify_v3(env.get("HUBSPOT_CLIENT_SECRET", ""), request.method, uri, body,
                              h.get("X-HubSpot-Signature-v3"), h.get("X-HubSpot-Request-Timestamp"))
        elif source == "jobber":
            jobber.verify(env.get("JOBBER_WEBHOOK_SECRET"), body, h.get("X-Jobber-Hmac-SHA256"))
        else:
            token = env.get("SALESFORCE_WEBHOOK_TOKEN")
            got = h.get("Authorization", "")
            if not token:
                raise Unauthorized("SALESFORCE_WEBHOOK_TOKEN is not set")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                raise Unauthorized("missing or wrong bearer token")
    except (stripe_events.SignatureError, hubspot.SignatureError, jobber.SignatureError) as exc:
        raise Unauthorized(str(exc)) from exc
    except Unauthorized:
        raise
    except Exception as exc:  # a header no vendor would send (not text, not a number) is not a signature either
        raise Unauthorized(f"signature headers are malformed ({type(exc).__name__})") from exc


def map_body(source: str, body: bytes, ctx: c.Context, dedupe: Deduper, limits: boundary.Limits) -> Batch:
    """A verified body through the input boundary and the mapper: a batch of events and dead letters, never an error."""
    where = f"POST /webhooks/{source}"
    try:
        try:
            record: Any = boundary.loads(body, limits)
        except c.BadInput as exc:
            record = c.BadInput(f"body is {exc}" if isinstance(exc, boundary.NotJSON) else str(exc))
        return normalize(source, body, ctx, dedupe, units=[(body, record)], name=where)
    except Exception as exc:  # normalize raises nothing on input; if it ever does, the body is still kept
        log.exception("mapping a %s webhook body failed", source)
        return Batch(source, deadletters=[dead_letter(source, body, "normalize", type(exc).__name__,
                                                      f"could not be mapped: {exc}", None, ctx, where)])


def make_app(bootstrap: str, identity: IdentityMap | None = None, dedupe: Deduper | None = None,
             timeout_s: float = 30.0, env: dict[str, str] | None = None) -> web.Application:
    """The webhook application, publishing to the broker at ``bootstrap``."""
    publisher = Publisher(bootstrap, timeout_s=timeout_s)
    # mappings are checked before the first request, so a bad file stops the receiver with file:line
    ctx = c.Context(identity=identity or IdentityMap(),
                    settings={"hubspot": hubspot.load_config(), "join_keys": join_keys.load()})
    dedupe = dedupe or Deduper()
    secrets = env if env is not None else dict(os.environ)
    # One mapping thread: bodies queue for it rather than take turns with the event loop for the interpreter lock.
    mapping_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="concord-webhook-map")

    async def receive(request: web.Request) -> web.Response:
        source = request.match_info["source"]
        loop = asyncio.get_running_loop()
        if source not in MAPPERS:
            return web.json_response({"error": f"no webhook for {source!r}"}, status=404)
        limit = max_record_bytes()
        body, size, sha256 = await read_capped(request, max(HARD_CAP, limit))
        if size > len(body):
            metrics.INGESTED.labels(source, "too_large").inc()
            error = f"body is {size} bytes, over the {max(HARD_CAP, limit)}-byte cap: not read, not stored"
            _refused(source, request, 413, error, size, sha256)
            return web.json_response({"error": error, "size": size, "sha256": sha256, "limit": limit}, status=413)
        try:  # an HMAC over a large body is CPU work: off the loop as well
            await loop.run_in_executor(mapping_pool, verify, source, request, body, secrets)
        except Unauthorized as exc:
            metrics.INGESTED.labels(source, "unauthorized").inc()
            _refused(source, request, 401, str(exc), size, sha256)
            return web.json_response({"error": str(exc)}, status=401)
        if size > limit:
            batch = Batch(source, deadletters=[oversized(source, body, limit, None, ctx, f"POST /webhooks/{source}")])
        else:
            # Mapping runs off the event loop, bounded in time, so no body can keep /healthz (or anyone) waiting.
            limits = boundary.Limits.from_env()
            work = loop.run_in_executor(mapping_pool, map_body, source, body, ctx, dedupe, limits)
            try:
                batch = await asyncio.wait_for(asyncio.shield(work), limits.parse_seconds)
            except TimeoutError:
                metrics.INGESTED.labels(source, "timeout").inc()
                error = (f"mapping the body took over {limits.parse_seconds}s "
                         f"({boundary.setting_name('parse_seconds')}): refused, kept as a dead letter")
                batch = Batch(source, deadletters=[dead_letter(source, body, "normalize", "Timeout", error, None, ctx,
                                                               f"POST /webhooks/{source}")])
                try:
                    await loop.run_in_executor(None, publisher.publish, batch)
                except PublishError as exc:
                    return web.json_response({"error": f"not stored: {exc}"}, status=503)
                count(batch)
                return web.json_response({"error": error, "rejected": 1,
                                          "dead_letter_topic": deadletter_topic(f"ingest.{source}")}, status=422)
        try:
            await loop.run_in_executor(None, publisher.publish, batch)
        except PublishError as exc:
            return web.json_response({"error": f"not stored: {exc}"}, status=503)
        dedupe.remember(batch.dedupe_keys)
        count(batch)
        if ctx.identity is not None:
            ctx.identity.save()
        result: dict[str, Any] = {"published": len(batch.events), "duplicate": batch.duplicates,
                                  "rejected": batch.rejected, "needs_reread": batch.gaps, "skipped": batch.skipped}
        if size > limit:
            error = batch.deadletters[0].record["error"]
            _refused(source, request, 413, error, size, sha256)
            return web.json_response({**result, "error": error, "size": size, "sha256": sha256, "limit": limit,
                                      "dead_letter_topic": deadletter_topic(f"ingest.{source}")}, status=413)
        unusable = batch.rejected and not (batch.events or batch.duplicates or batch.gaps or batch.skipped)
        if unusable:
            result["error"] = batch.deadletters[0].record["error"]
            result["dead_letter_topic"] = deadletter_topic(f"ingest.{source}")
            # An event type Concord does not map is kept on the dead-letter topic and acknowledged: a 4xx would
            # only make the vendor redeliver it for days. A body that is broken is refused.
            if all(UNMAPPED in d.record["error"] for d in batch.deadletters):
                return web.json_response({**result, "ignored": True}, status=200)
        return web.json_response(result, status=400 if unusable else 200)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def close(app: web.Application) -> None:
        mapping_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, publisher.close)

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/webhooks/{source}", receive)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.on_cleanup.append(close)
    return app


def run(args: argparse.Namespace) -> int:
    """The ``concord webhooks`` command."""
    import contextlib

    from concord.contracts.topics import CHANGES, INGEST_DEADLETTERS
    from concord.runtime.broker import ensure_topics, open_broker

    try:
        hubspot.load_config()
        join_keys.load()
    except ConfigError as exc:
        print(f"concord webhooks: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            bootstrap = stack.enter_context(open_broker()).bootstrap_servers
        ensure_topics(bootstrap, [*CHANGES, *INGEST_DEADLETTERS])
        app = make_app(bootstrap, IdentityMap(args.identity), Deduper(args.dedupe_file), args.timeout)
        web.run_app(app, host=args.host, port=args.port,
                    print=lambda _: print(f"concord webhooks: listening on http://{args.host}:{args.port} "
                                          f"(broker {bootstrap})", flush=True))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord webhooks``."""
    p = sub.add_parser("webhooks", help="receive Stripe, HubSpot, Salesforce and Jobber webhooks",
                       description="Serve POST /webhooks/{stripe,hubspot,salesforce,jobber} (signatures verified; "
                       "200 only once the broker acknowledged) and GET /metrics.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=6067, help="port (default 6067)")
    p.add_argument("--identity", default=os.environ.get("CONCORD_IDENTITY_FILE", DEFAULT_PATH),
                   help=f"identity cross-reference file (default {DEFAULT_PATH})")
    p.add_argument("--dedupe-file", default=os.environ.get("CONCORD_DEDUPE_FILE"),
                   help="remember published record keys here across restarts")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker's acknowledgement")
    p.set_defaults(func=run)
