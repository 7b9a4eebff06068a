"""``concord adapters``: run the command consumers against a sandbox database, Stripe, Salesforce, HubSpot or HTTP."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any

from concord.contracts.topics import COMMAND_OUTCOMES, COMMANDS, TARGET_SYSTEMS, Deployment
from connectors.outbound.base import FatalError, Target
from connectors.outbound.consumer import Adapter, AdapterError, RetryPolicy

BACKENDS = ("sandbox", "stripe", "salesforce", "hubspot", "http")
# Which command topics a backend can serve (the vendor targets serve their own system only).
SERVES = {"sandbox": set(TARGET_SYSTEMS), "http": set(TARGET_SYSTEMS), "stripe": {"billing"},
          "salesforce": {"crm"}, "hubspot": {"crm"}}


def make_target(args: argparse.Namespace) -> Target:
    """The backend named by ``--target``, configured from the arguments and the environment."""
    if args.target == "sandbox":
        from connectors.outbound.sandbox import SandboxTarget

        return SandboxTarget(args.db, dsn=args.dsn)
    if args.target == "stripe":
        from connectors.outbound.stripe_target import StripeTarget

        return StripeTarget(api_base=args.base_url or os.environ.get("STRIPE_API_BASE"), currency=args.currency)
    if args.target == "salesforce":
        from connectors.outbound.salesforce_target import SalesforceTarget

        return SalesforceTarget(instance_url=args.base_url, timeout=args.request_timeout)
    if args.target == "hubspot":
        from connectors.outbound.hubspot_target import HubSpotTarget

        return HubSpotTarget(host=args.base_url, timeout=args.request_timeout)
    from connectors.outbound.http_target import HttpTarget

    if not args.base_url:
        raise FatalError("--target http needs --base-url (or CONCORD_HTTP_BASE_URL)")
    return HttpTarget(args.base_url, timeout=args.request_timeout)


def _usage(msg: str) -> int:
    print(f"concord adapters: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The ``concord adapters`` command."""
    systems = [s.strip() for s in args.topics.split(",") if s.strip()]
    unknown = [s for s in systems if s not in TARGET_SYSTEMS]
    if not systems or unknown:
        return _usage(f"--topics takes a comma-separated subset of {','.join(TARGET_SYSTEMS)}, got {args.topics!r}")
    if not set(systems) <= SERVES[args.target]:
        return _usage(f"the {args.target} target serves {','.join(sorted(SERVES[args.target]))} only")
    if args.max_attempts < 1 or args.backoff <= 0 or args.max_backoff < args.backoff:
        return _usage("need --max-attempts >= 1 and 0 < --backoff <= --max-backoff")
    from concord.exceptions import ConfigError
    from concord.runtime.broker import ensure_topics, open_broker

    try:
        names = Deployment(args.app_id)
    except ConfigError as exc:
        return _usage(f"--app-id: {exc}")

    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            bootstrap = stack.enter_context(open_broker()).bootstrap_servers
            print(f"concord adapters: no KAFKA_BOOTSTRAP_SERVERS; using an empty embedded broker at {bootstrap}",
                  file=sys.stderr)
        try:
            target = make_target(args)
        except FatalError as exc:
            print(f"concord adapters: error: {exc}", file=sys.stderr)
            return 1
        if not args.no_create_topics:
            try:
                ensure_topics(bootstrap, [*COMMANDS, *names.specs, COMMAND_OUTCOMES], timeout=args.timeout)
            except Exception as exc:
                target.close()
                print(f"concord adapters: broker at {bootstrap} did not answer: {exc}", file=sys.stderr)
                return 1
        if args.metrics_port:
            from prometheus_client import start_http_server

            from concord.runtime.metrics import REGISTRY

            start_http_server(args.metrics_port, addr=args.metrics_host, registry=REGISTRY)
        adapter = Adapter(bootstrap, target, systems, names, group=args.group,
                          retry=RetryPolicy(args.backoff, args.max_backoff, args.max_attempts),
                          session_timeout_ms=args.session_timeout_ms)
        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, --once still ends
                previous[sig] = signal.signal(sig, lambda *_: adapter.stop())
        where = getattr(target, "where", None) or getattr(target, "base_url", None) or target.name
        print(f"concord adapters: {target.name} ({where}) consuming {', '.join(adapter.topics)} as group "
              f"{adapter.group}{' until drained' if args.once else ''}", file=sys.stderr)
        try:
            summary = adapter.run(once=args.once, timeout=args.timeout)
        except AdapterError as exc:
            print(f"concord adapters: error: {exc}", file=sys.stderr)
            print(f"concord adapters: {adapter.summary.line()}", file=sys.stderr)
            return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"concord adapters: {summary.line()}", file=sys.stderr)
        return 0
    return 1  # pragma: no cover - ExitStack does not swallow


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord adapters``."""
    p = sub.add_parser(
        "adapters", help="consume commands.<system> and apply them to a sandbox database, Stripe, Salesforce, HubSpot "
        "or an HTTP API",
        description="Apply commands exactly once per command_id (at-least-once delivery, idempotency keys): "
        "transient failures are retried with capped exponential backoff, rejections become command_rejected "
        "exceptions, offsets are committed after the effect. Secrets come from the environment only "
        "(STRIPE_API_KEY, SALESFORCE_INSTANCE_URL + SALESFORCE_SESSION_ID or SALESFORCE_USERNAME / "
        "SALESFORCE_PASSWORD / SALESFORCE_SECURITY_TOKEN, HUBSPOT_ACCESS_TOKEN, CONCORD_HTTP_TOKEN). "
        "Exit status: 0 ok, 1 error, 2 usage.")
    p.add_argument("--target", required=True, choices=BACKENDS, help="the backend that applies the commands")
    p.add_argument("--topics", default="billing,crm,dispatch",
                   help="comma-separated command topics to consume: billing, crm, dispatch (default all three)")
    p.add_argument("--db", default=os.environ.get("CONCORD_SANDBOX_DB", ".concord/sandbox.db"),
                   help="sandbox SQLite file (default .concord/sandbox.db)")
    p.add_argument("--dsn", default=os.environ.get("CONCORD_SANDBOX_DSN"),
                   help="sandbox PostgreSQL DSN instead of SQLite (needs psycopg; env CONCORD_SANDBOX_DSN)")
    p.add_argument("--base-url", default=os.environ.get("CONCORD_HTTP_BASE_URL"),
                   help="http: receiver base URL (POST {base}/commands/{type}); stripe: API base "
                   "(env STRIPE_API_BASE); salesforce: instance URL (env SALESFORCE_INSTANCE_URL); "
                   "hubspot: API base (env HUBSPOT_API_BASE)")
    p.add_argument("--currency", default="usd", help="stripe: currency of lines without a price id (default usd)")
    p.add_argument("--group", help="consumer group (default concord-adapters-<target>)")
    p.add_argument("--app-id", default=os.environ.get("CONCORD_APP_ID", "concord"),
                   help="the deployment whose exception queues get rejected commands (default $CONCORD_APP_ID or "
                   "concord)")
    p.add_argument("--once", action="store_true", help="apply what is on the topics now, then exit")
    p.add_argument("--max-attempts", type=int, default=8, help="attempts per command on transient failures (8)")
    p.add_argument("--backoff", type=float, default=0.2, help="first retry delay in seconds, doubling (0.2)")
    p.add_argument("--max-backoff", type=float, default=10.0, help="longest retry delay in seconds (10)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="http, salesforce, hubspot: seconds per request (10)")
    p.add_argument("--session-timeout-ms", type=int, default=6000,
                   help="consumer session timeout; 6000-10000 suits the embedded broker (6000)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the broker, and with --once for an assignment or progress (60)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (127.0.0.1)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")
    p.set_defaults(func=run)
