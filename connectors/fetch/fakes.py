"""Loopback fakes of the vendor APIs the fetcher reads, answering as the vendors document (errors included).

Used by the tests and by the fetch benchmark; they listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class Script:
    """What a fake answers: records by id, then failures to serve first (status, headers, body) per id."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, list[tuple[int, dict[str, str], dict[str, Any]]]] = field(default_factory=dict)
    latency_s: float = 0.0
    calls: list[str] = field(default_factory=list)
    hold: Callable[[str], Any] | None = None  # awaited before answering (a request left in flight)
    base: str = ""  # where the fake listens, once served
    rate_limit_per_s: int = 0  # above this many requests in a window: 429, as the vendor's limiter answers
    rate_window_s: float = 1.0  # the limiter's window (HubSpot private apps: 100 requests per 10 seconds)
    page_size: int = 2000  # Salesforce query results per page (its default batch is 2000)
    _recent: list[float] = field(default_factory=list)
    limited: int = 0

    def over_limit(self) -> bool:
        """Whether this request is past the per-second limit (counted when it is)."""
        if not self.rate_limit_per_s:
            return False
        now = time.monotonic()
        self._recent[:] = [t for t in self._recent if now - t < self.rate_window_s]
        if len(self._recent) >= self.rate_limit_per_s:
            self.limited += 1
            return True
        self._recent.append(now)
        return False


def stripe_error(status: int, etype: str, message: str, code: str | None = None) -> tuple[int, dict, dict]:
    """A Stripe error answer: ``{"error": {type, code, message}}``."""
    body = {"error": {"type": etype, "message": message, **({"code": code} if code else {})}}
    return status, {"Request-Id": "req_fake"}, body


def stripe_app(script: Script, key: str = "sk_test_fetch") -> web.Application:
    """GET /v1/{invoices,payment_intents,customers}/{id} with a Bearer secret key."""
    async def retrieve(request: web.Request) -> web.Response:
        oid = request.match_info["id"]
        script.calls.append(oid)
        if script.hold is not None:
            await script.hold(oid)
        if script.latency_s:
            await asyncio.sleep(script.latency_s)
        if request.headers.get("Authorization") != f"Bearer {key}":
            status, headers, body = stripe_error(401, "invalid_request_error", "Invalid API Key provided: sk_***")
            return web.json_response(body, status=status, headers=headers)
        if script.over_limit():  # Stripe sends no Retry-After: clients back off exponentially
            status, headers, body = stripe_error(429, "invalid_request_error", "Request rate limit exceeded.",
                                                 "rate_limit")
            return web.json_response(body, status=status, headers=headers)
        queued = script.failures.get(oid) or []
        if queued:
            status, headers, body = queued.pop(0)
            return web.json_response(body, status=status, headers=headers)
        if oid not in script.records:
            status, headers, body = stripe_error(404, "invalid_request_error", f"No such object: '{oid}'",
                                                 "resource_missing")
            return web.json_response(body, status=status, headers=headers)
        return web.json_response(script.records[oid],
                                 headers={"Request-Id": "req_fake", "Stripe-Version": "2025-03-31.basil"})

    app = web.Application()
    app.router.add_get("/v1/{kind:invoices|payment_intents|customers}/{id}", retrieve)
    return app


def hubspot_error(status: int, message: str, category: str, **extra: str) -> tuple[int, dict, dict]:
    """A HubSpot error answer: ``{"status": "error", "message", "category", "correlationId"}``."""
    return status, {}, {"status": "error", "message": message, "category": category,
                        "correlationId": "0f3e1c2a-fake", **extra}


def hubspot_app(script: Script, token: str = "hubspot-token") -> web.Application:
    """GET /crm/v3/objects/{deals,companies}/{id}?properties=…&associations=companies."""
    async def get(request: web.Request) -> web.Response:
        oid = request.match_info["id"]
        script.calls.append(oid)
        if script.latency_s:
            await asyncio.sleep(script.latency_s)
        if request.headers.get("Authorization") != f"Bearer {token}":
            status, headers, body = hubspot_error(401, "Authentication credentials not found.",
                                                  "INVALID_AUTHENTICATION")
            return web.json_response(body, status=status, headers=headers)
        if script.over_limit():
            policy = "SECONDLY" if script.rate_window_s <= 1 else "TEN_SECONDLY_ROLLING"
            said = "You have reached your secondly limit." if policy == "SECONDLY" else \
                "You have reached your ten_secondly_rolling limit."
            status, headers, body = hubspot_error(429, said, "RATE_LIMITS", errorType="RATE_LIMIT",
                                                  policyName=policy)
            return web.json_response(body, status=status, headers=headers)
        queued = script.failures.get(oid) or []
        if queued:
            status, headers, body = queued.pop(0)
            return web.json_response(body, status=status, headers=headers)
        rec = script.records.get(oid)
        if rec is None:
            status, headers, body = hubspot_error(404, "Object not found.  objectId are usually numeric.",
                                                  "OBJECT_NOT_FOUND")
            return web.json_response(body, status=status, headers=headers)
        wanted = [p for v in request.query.getall("properties", []) for p in v.split(",") if p]
        doc = {"id": oid, "properties": {k: v for k, v in rec.get("properties", {}).items() if k in wanted},
               "createdAt": "2024-05-01T10:00:00.000Z", "updatedAt": rec.get("updatedAt", "2024-05-01T10:05:00.000Z"),
               "archived": False}
        if "companies" in ",".join(request.query.getall("associations", [])) and rec.get("companies"):
            doc["associations"] = {"companies": {"results": [{"id": cid, "type": "deal_to_company"}
                                                             for cid in rec["companies"]]}}
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/crm/v3/objects/{kind:deals|companies}/{id}", get)
    return app


def salesforce_error(status: int, code: str, message: str) -> tuple[int, dict, list]:
    """A Salesforce REST error answer: ``[{"errorCode", "message"}]``."""
    return status, {}, [{"errorCode": code, "message": message}]


def salesforce_app(script: Script, session_id: str = "00Dfake!session", version: str = "59.0") -> web.Application:
    """GET /services/data/v<version>/sobjects/{Account,Opportunity}/<id> with a Bearer session id."""
    async def get(request: web.Request) -> web.Response:
        name, oid = request.match_info["name"], request.match_info["id"]
        script.calls.append(oid)
        if script.latency_s:
            await asyncio.sleep(script.latency_s)
        if request.headers.get("Authorization") != f"Bearer {session_id}":
            status, headers, body = salesforce_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            return web.json_response(body, status=status, headers=headers)
        queued = script.failures.get(oid) or []
        if queued:
            status, headers, body = queued.pop(0)
            return web.json_response(body, status=status, headers=headers)
        rec = script.records.get(oid)
        if rec is None:
            status, headers, body = salesforce_error(404, "NOT_FOUND", "The requested resource does not exist")
            return web.json_response(body, status=status, headers=headers)
        return web.json_response({"attributes": {"type": name, "url": str(request.rel_url)}, "Id": oid, **rec})

    pages: dict[str, list[dict[str, Any]]] = {}

    def page(records: list[dict[str, Any]], at: int) -> web.Response:
        done = at + script.page_size >= len(records)
        doc: dict[str, Any] = {"totalSize": len(records), "done": done,
                               "records": records[at:at + script.page_size]}
        if not done:
            locator = f"01gFAKE{len(pages):06d}-{at + script.page_size}"
            pages[locator] = records
            doc["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}"
        return web.json_response(doc)

    async def query(request: web.Request) -> web.Response:
        """SOQL ``SELECT … FROM Account|Opportunity WHERE SystemModstamp >= <datetime> ORDER BY …``, paged."""
        soql = request.query.get("q", "")
        script.calls.append(soql)
        if script.latency_s:
            await asyncio.sleep(script.latency_s)
        if request.headers.get("Authorization") != f"Bearer {session_id}":
            status, headers, body = salesforce_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            return web.json_response(body, status=status, headers=headers)
        queued = script.failures.get("query") or []
        if queued:
            status, headers, body = queued.pop(0)
            return web.json_response(body, status=status, headers=headers)
        m = re.search(r"\bFROM\s+(Account|Opportunity)\s+WHERE\s+SystemModstamp\s*>=\s*(\S+)", soql)
        if not m:
            status, headers, body = salesforce_error(400, "MALFORMED_QUERY", f"unexpected query: {soql[:200]}")
            return web.json_response(body, status=status, headers=headers)
        prefix = {"Account": "001", "Opportunity": "006"}[m.group(1)]
        since = _sf_time(m.group(2))
        found = sorted((rec.get("SystemModstamp", ""), rid) for rid, rec in script.records.items()
                       if rid.startswith(prefix) and rec.get("SystemModstamp") and _sf_time(rec["SystemModstamp"])
                       >= since)
        records = [{"attributes": {"type": m.group(1), "url": f"/services/data/v{version}/sobjects/{m.group(1)}/"
                                   f"{rid}"}, "Id": rid, **script.records[rid]} for _, rid in found]
        return page(records, 0)

    async def more(request: web.Request) -> web.Response:
        locator = request.match_info["locator"]
        script.calls.append(locator)
        base_locator, _, at = locator.rpartition("-")
        records = pages.get(locator)
        if records is None:
            status, headers, body = salesforce_error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            return web.json_response(body, status=status, headers=headers)
        return page(records, int(at))

    app = web.Application()
    app.router.add_get(f"/services/data/v{version}/sobjects/{{name:Account|Opportunity}}/{{id}}", get)
    app.router.add_get(f"/services/data/v{version}/query/", query)
    app.router.add_get(f"/services/data/v{version}/query", query)
    app.router.add_get(f"/services/data/v{version}/query/{{locator}}", more)
    return app


def _sf_time(text: str) -> datetime:
    """A SOQL datetime literal or a REST datetime (``2026-01-02T03:04:05.000Z`` / ``…+0000``)."""
    t = text.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", t):
        t = t[:-2] + ":" + t[-2:]
    return datetime.fromisoformat(t)


def loopback_tls(folder: Path) -> tuple[ssl.SSLContext, str]:
    """A self-signed certificate for 127.0.0.1 (written to ``folder``): the server's context and the CA file."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx, str(folder / "cert.pem")


def jobber_app(script: Script, token: str = "jobber-token") -> web.Application:
    """POST /api/graphql answering ``job(id)`` / ``visit(id) { job }``; THROTTLED as a GraphQL error."""
    async def graphql(request: web.Request) -> web.Response:
        doc = await request.json()
        oid = doc["variables"]["id"]
        script.calls.append(oid)
        if script.latency_s:
            await asyncio.sleep(script.latency_s)
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"message": "Unauthorized"}, status=401)
        if script.over_limit():  # the DDoS middleware: 2500 requests per 5 minutes per app and account
            return web.json_response({"message": "Too Many Requests"}, status=429, headers={"Retry-After": "1"})
        queued = script.failures.get(oid) or []
        if queued:
            status, headers, body = queued.pop(0)
            return web.json_response(body, status=status, headers=headers)
        visit = "visit(" in doc["query"]
        job = script.records.get(oid)
        if job is None:
            return web.json_response({"data": {"visit" if visit else "job": None},
                                      "errors": [{"message": f"Record not found: {oid}", "path": ["job"]}]})
        return web.json_response({"data": {"visit": {"job": job}} if visit else {"job": job},
                                  "extensions": {"cost": {"requestedQueryCost": 12, "actualQueryCost": 12,
                                                          "throttleStatus": {"maximumAvailable": 10000,
                                                                             "currentlyAvailable": 9988,
                                                                             "restoreRate": 500}}}})

    app = web.Application()
    app.router.add_post("/api/graphql", graphql)
    return app


def jobber_throttled(cost: int = 600, available: int = 100, rate: int = 500) -> tuple[int, dict, dict]:
    """Jobber's answer when the query-cost bucket is short: 200 with a THROTTLED error."""
    return 200, {}, {"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}],
                     "extensions": {"cost": {"requestedQueryCost": cost, "actualQueryCost": 0,
                                             "throttleStatus": {"maximumAvailable": 10000,
                                                                "currentlyAvailable": available,
                                                                "restoreRate": rate}}}}


def as_json(doc: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(doc).encode()


@contextmanager
def serve(app: web.Application, tls: Any = None) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread (over TLS with an ``ssl.SSLContext``); yields its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    if not started.wait(10):
        raise RuntimeError("the fake did not start")
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
