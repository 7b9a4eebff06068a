"""``concord fetch``: answer gap notices by reading their records from the vendors' APIs."""

from __future__ import annotations

import argparse
import os
import sys

from concord.exceptions import ConcordError
from connectors.fetch import fetcher as f
from connectors.fetch.readers import HubSpotReader, JobberReader, PermanentReadError, SalesforceReader, StripeReader
from connectors.inbound import common as c
from connectors.inbound.hubspot import load_config as load_hubspot_config
from connectors.inbound.identity import DEFAULT_PATH, IdentityMap
from connectors.inbound.ingest import PublishError
from connectors.inbound.join_keys import load as load_join_keys
from connectors.outbound.consumer import RetryPolicy

EXIT_OK, EXIT_STALLED, EXIT_CONFIG = 0, 1, 2
READERS: dict[str, type[f.Reader]] = {"stripe": StripeReader, "hubspot": HubSpotReader, "jobber": JobberReader,
                                      "salesforce": SalesforceReader}


def run(args: argparse.Namespace) -> int:
    """The ``concord fetch`` command: 0 stopped cleanly, 1 a vendor stayed down (nothing lost), 2 bad setup."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("concord fetch: error: set KAFKA_BOOTSTRAP_SERVERS (the notices live on that broker)", file=sys.stderr)
        return EXIT_CONFIG
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = [s for s in sources if s not in READERS]
    if unknown or not sources:
        print(f"concord fetch: error: --sources takes {', '.join(READERS)} (got {args.sources!r})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        readers: dict[str, f.Reader] = {s: READERS[s]() for s in sources}
        ctx = c.Context(identity=IdentityMap(args.identity),
                        settings={"join_keys": load_join_keys(), "hubspot": load_hubspot_config()})
    except (PermanentReadError, ConcordError) as exc:
        print(f"concord fetch: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from concord.contracts.topics import CHANGES, INGEST_DEADLETTERS, Deployment
    from concord.runtime.broker import ensure_topics

    try:
        names = Deployment(args.app_id)
    except ConcordError as exc:
        print(f"concord fetch: error: --app-id: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        ensure_topics(bootstrap, [*CHANGES, *INGEST_DEADLETTERS, *names.specs])
    except Exception as exc:  # noqa: BLE001 - any admin failure means the broker is not usable
        print(f"concord fetch: error: broker at {bootstrap} did not answer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    fetcher = f.Fetcher(readers, ctx, RetryPolicy(attempts=args.attempts))
    print(f"concord fetch: reading gap notices of {', '.join(sources)} from {bootstrap} (group {args.group})",
          file=sys.stderr, flush=True)
    try:
        summary = f.run(bootstrap, fetcher, names, sources, args.group, args.concurrency,
                        log=lambda text: print(text, file=sys.stderr, flush=True))
    except (f.FetchStalled, PublishError) as exc:
        print(f"concord fetch: error: {exc}; not committed, the notice is fetched again on restart", file=sys.stderr)
        return EXIT_STALLED
    except KeyboardInterrupt:
        fetcher.stop.set()
        return EXIT_OK
    finally:
        if ctx.identity is not None:
            ctx.identity.save()
    print(f"concord fetch: fetched {summary.fetched}, failed {summary.failed}", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord fetch``."""
    p = sub.add_parser("fetch", help="read the records gap notices name from the vendors' APIs, publish snapshots",
                       description="Consume the gap notices on deadletter.ingest.<source> (notifications that lacked "
                       "their record: Stripe thin events, HubSpot creations, Jobber id-only webhooks, Salesforce "
                       "gap events), read each record through the "
                       "vendor's API (STRIPE_API_KEY / STRIPE_API_BASE; HUBSPOT_ACCESS_TOKEN / HUBSPOT_API_BASE; "
                       "SALESFORCE_INSTANCE_URL / SALESFORCE_SESSION_ID; "
                       "JOBBER_ACCESS_TOKEN / JOBBER_API_URL) and "
                       "publish it as a snapshot event in the notice's place in order. 429s and 5xx are retried "
                       "with backoff; a permanent failure becomes a dead letter (stage fetch) and a fetch_failed "
                       "exception. Offsets are committed only after publishing. Exit status: 0 stopped; 1 a vendor "
                       "stayed unreachable (not committed); 2 bad setup.")
    p.add_argument("--sources", default=",".join(f.SOURCES),
                   help="comma-separated: stripe, hubspot, jobber, salesforce (default all four)")
    p.add_argument("--group", default="concord-fetcher", help="consumer group (default concord-fetcher)")
    p.add_argument("--app-id", default=os.environ.get("CONCORD_APP_ID", "concord"),
                   help="the deployment whose exception queues get fetch_failed (default $CONCORD_APP_ID or concord)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--attempts", type=int, default=8, help="tries per record before stopping uncommitted (default 8)")
    p.add_argument("--identity", default=os.environ.get("CONCORD_IDENTITY_FILE", DEFAULT_PATH),
                   help=f"identity cross-reference file (default {DEFAULT_PATH})")
    p.set_defaults(func=run)
