"""Outbound adapters: one contract run against every target, retries, rejections and redelivery on the broker."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kafka_helpers import deployment, end_offsets, produce, read_until
from kafka_helpers import start_group_at_end as start_at_end

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.domain.rules import stable_id
from concord.runtime.metrics import REGISTRY
from concord.tools import cli
from connectors.outbound.base import APPLIED, DUPLICATE, Command, FatalError, PermanentError, TransientError
from connectors.outbound.consumer import Adapter, AdapterError, Origin, RetryPolicy
from connectors.outbound.http_target import HttpTarget
from connectors.outbound.sandbox import SandboxTarget
from connectors.outbound.stripe_target import StripeTarget

CODEC = Codec()
NAMES = topics.Deployment("concord-test-adapters")  # no broker: where a rejection would be raised
FAST = RetryPolicy(initial=0.01, maximum=0.05, attempts=4)


# ---- loopback servers ------------------------------------------------------------------------------
@dataclass
class Req:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode()).items()}

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class Server:
    """A real HTTP server on 127.0.0.1 whose answers come from ``respond``; it records every request."""

    respond: Callable[[Req], tuple[int, dict[str, Any]]]
    requests: list[Req] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer before behaving

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                u = urlsplit(self.path)
                req = Req(self.command, u.path, parse_qs(u.query), {k.lower(): v for k, v in self.headers.items()},
                          self.rfile.read(n))
                outer.requests.append(req)
                if outer.fail_next:
                    status, doc = outer.fail_next.pop(0), {"error": {"type": "api_error", "message": "try again"}}
                else:
                    status, doc = outer.respond(req)
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _error(status: int, message: str, code: str = "") -> tuple[int, dict[str, Any]]:
    return status, {"error": {"type": "invalid_request_error", "message": message, "code": code}}


class FakeStripe:
    """Just enough of Stripe's API, with idempotency-key replay, to hold the target to the contract."""

    def __init__(self, customers: tuple[str, ...] = ("cus_ok",)) -> None:
        self.customers = set(customers)
        self.invoices: dict[str, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self.replayed: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self.server = Server(self.respond)

    def respond(self, r: Req) -> tuple[int, dict[str, Any]]:
        if r.method == "POST" and r.key:
            ck = (r.path, r.key)
            if ck not in self.replayed:
                self.replayed[ck] = self._handle(r)
            return self.replayed[ck]
        return self._handle(r)

    def _handle(self, r: Req) -> tuple[int, dict[str, Any]]:
        f, parts = r.form, r.path.strip("/").split("/")[1:]
        md = {k[9:-1]: v for k, v in f.items() if k.startswith("metadata[")}
        if r.method == "POST" and parts == ["invoices"]:
            if f.get("customer") not in self.customers:
                return _error(400, f"No such customer: '{f.get('customer')}'", "resource_missing")
            inv = {"id": f"in_{len(self.invoices) + 1}", "object": "invoice", "status": "draft",
                   "customer": f["customer"], "metadata": md}
            self.invoices[inv["id"]] = inv
            return 200, inv
        if r.method == "POST" and parts == ["invoiceitems"]:
            item = {"id": f"ii_{len(self.items) + 1}", "object": "invoiceitem", "invoice": f.get("invoice"),
                    "quantity": int(f.get("quantity", 1)), "metadata": md}
            self.items[item["id"]] = item
            return 200, item
        if r.method == "GET" and parts == ["invoiceitems"]:
            inv = r.query.get("invoice", [""])[0]
            return 200, {"object": "list", "url": "/v1/invoiceitems", "has_more": False,
                         "data": [i for i in self.items.values() if i["invoice"] == inv]}
        if r.method == "GET" and parts == ["invoices", "search"]:
            want = r.query["query"][0].split(":", 1)[1].strip("'")
            return 200, {"object": "search_result", "url": "/v1/invoices/search", "has_more": False,
                         "data": [i for i in self.invoices.values()
                                  if i["metadata"].get("concord_command_id") == want]}
        if parts[:1] == ["invoices"] and len(parts) >= 2:
            inv = self.invoices.get(parts[1])
            if inv is None:
                return _error(404, f"No such invoice: '{parts[1]}'", "resource_missing")
            if parts[2:] == ["void"]:
                if inv["status"] == "void":
                    return _error(400, "You can only void invoices that are open or uncollectible")
                inv["status"] = "void"
            elif r.method == "POST":
                inv["metadata"].update(md)
            return 200, inv
        if r.method == "POST" and parts[:1] == ["customers"] and len(parts) == 2:
            if parts[1] not in self.customers:
                return _error(404, f"No such customer: '{parts[1]}'", "resource_missing")
            return 200, {"id": parts[1], "object": "customer", "name": f.get("name"), "metadata": md}
        return _error(404, f"unrouted {r.method} {r.path}")

    def created_for(self, command_id: str) -> list[dict[str, Any]]:
        return [i for i in self.invoices.values() if i["metadata"].get("concord_command_id") == f"concord:{command_id}"]


class Receiver:
    """A dispatch-like JSON API: POST /commands/{type}; 409 for an idempotency key it already applied."""

    def __init__(self) -> None:
        self.applied: dict[str, dict[str, Any]] = {}
        self.invoices: set[str] = set()
        self.server = Server(self.respond)

    def respond(self, r: Req) -> tuple[int, dict[str, Any]]:
        if r.key in self.applied:
            return 409, {"id": self.applied[r.key]["id"], "error": "already applied"}
        doc = json.loads(r.body)
        ctype = r.path.rsplit("/", 1)[-1]
        if ctype == "void_invoice" and doc["payload"]["invoice_id"] not in self.invoices:
            return 422, {"error": f"unknown invoice {doc['payload']['invoice_id']}"}
        obj = {"id": f"obj_{len(self.applied) + 1}", "type": ctype, "doc": doc}
        if ctype == "create_invoice":
            self.invoices.add(obj["id"])
        self.applied[r.key or ""] = obj
        return 201, obj


# ---- commands --------------------------------------------------------------------------------------
def command(ctype: str, payload: dict[str, Any], uid: str, target: str = "billing", entity: str = "job",
            entity_id: str | None = None, issued_at: int | None = None) -> dict[str, Any]:
    entity_id = entity_id or f"{entity}-{uuid.uuid4().hex[:8]}-{uid}"
    return {"command_id": stable_id(ctype, target, entity, entity_id), "type": ctype, "target_system": target,
            "customer_id": payload.get("customer_id"), "entity_type": entity, "entity_id": entity_id,
            "payload": json.dumps(payload, sort_keys=True), "caused_by": [f"ev-{entity_id}"],
            "trace_id": f"trace-{entity_id}", "issued_at": issued_at or int(time.time() * 1000),
            "source_occurred_at": None}


def invoice_cmd(uid: str, customer: str = "cus_ok", **kw: Any) -> dict[str, Any]:
    payload = {"customer_id": f"acct-{uid}", "billing_account_id": customer, "billing_terms": "net_30",
               "job_id": f"job-{uid}", "amount_cents": 2500 * 2 + 990,
               "lines": [{"sku": "SVC-1", "price_id": "price_svc1", "quantity": 2, "unit_price_cents": 2500,
                          "description": "service call"},
                         {"sku": "PART-9", "price_id": None, "quantity": 1, "unit_price_cents": 990,
                          "description": "filter"}]}
    return command("create_invoice", payload, uid, **kw)


def cmd(rec: dict[str, Any]) -> Command:
    return Command.from_record(rec)


# ---- one contract, every target --------------------------------------------------------------------
@dataclass
class Backend:
    target: Any
    invoices_for: Callable[[str], int]  # how many invoices the system holds for a command id
    requests: Callable[[], list[Req]] = lambda: []


@pytest.fixture(params=["sandbox", "stripe", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "sandbox":
        t = SandboxTarget(tmp_path / "sandbox.db")
        db = tmp_path / "sandbox.db"

        def count(cid: str) -> int:
            with sqlite3.connect(db) as c:
                return c.execute("SELECT count(*) FROM invoices WHERE command_id = ?", (cid,)).fetchone()[0]

        yield Backend(t, count)
    elif request.param == "stripe":
        fake = FakeStripe()
        t = StripeTarget(api_key="sk_test_concord", api_base=fake.server.url)
        yield Backend(t, lambda cid: len(fake.created_for(cid)), lambda: fake.server.requests)
        fake.server.close()
    else:
        rcv = Receiver()
        t = HttpTarget(rcv.server.url)
        yield Backend(t, lambda cid: sum(1 for o in rcv.applied.values() if o["doc"]["command_id"] == cid
                                         and o["type"] == "create_invoice"), lambda: rcv.server.requests)
        rcv.server.close()
    t.close()


def test_contract_one_effect_per_command_id(backend: Backend, uid: str) -> None:
    c = cmd(invoice_cmd(uid))
    first = backend.target.apply(c)
    again = backend.target.apply(c)
    assert first.outcome == APPLIED and first.ref
    assert again.outcome in (APPLIED, DUPLICATE) and again.ref == first.ref
    assert backend.invoices_for(c.command_id) == 1
    for r in backend.requests():  # every request the target sent carried the command id as idempotency key
        if r.method == "POST":
            assert r.key is not None and r.key.startswith(c.command_id)


def test_contract_invalid_commands_are_permanent_and_send_nothing(backend: Backend, uid: str) -> None:
    no_lines = invoice_cmd(uid)
    no_lines["payload"] = json.dumps({**json.loads(no_lines["payload"]), "lines": []})
    for rec, said in ((no_lines, "no lines"), (command("launch_rocket", {}, uid), "does not handle"),
                      ({**invoice_cmd(uid), "payload": "[1, 2"}, "not JSON")):
        with pytest.raises(PermanentError, match=said):
            backend.target.apply(Command.from_record(rec))
    assert backend.requests() == []


def test_contract_the_system_refusing_is_permanent_with_its_words(backend: Backend, uid: str) -> None:
    c = cmd(command("void_invoice", {"invoice_id": f"in_missing_{uid}", "job_id": f"job-{uid}",
                                     "reason": "job cancelled"}, uid, entity="invoice"))
    with pytest.raises(PermanentError, match=f"in_missing_{uid}"):
        backend.target.apply(c)


def test_contract_void_after_create(backend: Backend, uid: str) -> None:
    created = backend.target.apply(cmd(invoice_cmd(uid)))
    void = cmd(command("void_invoice", {"invoice_id": created.ref, "job_id": f"job-{uid}", "reason": "cancelled"},
                       uid, entity="invoice", entity_id=created.ref))
    assert backend.target.apply(void).outcome == APPLIED
    assert backend.target.apply(void).outcome in (APPLIED, DUPLICATE)


# ---- target specifics ------------------------------------------------------------------------------
def test_sandbox_every_table_and_concurrent_redelivery(tmp_path: Any, uid: str) -> None:
    db = tmp_path / "s.db"
    cmds = [cmd(invoice_cmd(uid)),
            cmd(command("create_job", {"deal_id": f"deal-{uid}", "customer_id": f"acct-{uid}", "lines": [],
                                       "address": "1 Main St", "account_ref": "D-1"}, uid, "dispatch", "deal")),
            cmd(command("update_deal_billing_status", {"deal_id": f"deal-{uid}", "billing_status": "invoiced",
                                                       "invoice_id": "inv-1"}, uid, "crm", "deal")),
            cmd(command("update_customer", {"customer_id": f"acct-{uid}", "name": "Acme", "email": "a@acme.test",
                                            "billing_address": "1 Main St", "billing_terms": "net_30",
                                            "billing_account_id": "cus_1", "external_ids": {"stripe": "cus_1"}},
                        uid, "dispatch", "customer"))]
    SandboxTarget(db).close()
    outcomes: list[str] = []

    def deliver() -> None:  # four consumers, each with its own connection, all delivered every command
        t = SandboxTarget(db)
        outcomes.extend(t.apply(c).outcome for c in cmds)
        t.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcomes) == sorted([APPLIED] * 4 + [DUPLICATE] * 12)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM effects").fetchone()[0] == 4
        assert [c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("invoices", "jobs", "deal_billing_statuses", "customers")] == [1, 1, 1, 1]
        assert c.execute("SELECT amount_cents, status FROM invoices").fetchone() == (5990, "open")
        assert c.execute("SELECT billing_status FROM deal_billing_statuses").fetchone() == ("invoiced",)


def test_stripe_fields_and_echo_marker(uid: str) -> None:
    fake = FakeStripe()
    t = StripeTarget(api_key="sk_test_concord", api_base=fake.server.url)
    try:
        c = cmd(invoice_cmd(uid))
        t.apply(c)
        inv, item1, item2 = fake.server.requests
        assert (inv.path, inv.key) == ("/v1/invoices", c.command_id)
        assert inv.headers["authorization"] == "Bearer sk_test_concord"
        assert inv.form["customer"] == "cus_ok" and inv.form["collection_method"] == "send_invoice"
        assert inv.form["days_until_due"] == "30"
        assert inv.form["metadata[concord_command_id]"] == f"concord:{c.command_id}"
        assert (item1.path, item1.key, item1.form["pricing[price]"], item1.form["quantity"]) == \
            ("/v1/invoiceitems", f"{c.command_id}:line:0", "price_svc1", "2")
        assert (item2.form["unit_amount_decimal"], item2.form["currency"]) == ("990", "usd")
        assert item1.form["invoice"] == item2.form["invoice"] == "in_1"
        u = cmd(command("update_customer", {"customer_id": f"acct-{uid}", "name": "Acme", "email": "a@acme.test",
                                            "billing_address": "1 Main St", "billing_account_id": "cus_ok"}, uid,
                        entity="customer"))
        assert t.apply(u).ref == "cus_ok"
        r = fake.server.requests[-1]
        assert (r.path, r.key, r.form["address[line1]"], r.form["metadata[concord_customer_id]"]) == \
            ("/v1/customers/cus_ok", u.command_id, "1 Main St", f"acct-{uid}")
    finally:
        t.close()
        fake.server.close()


def test_stripe_command_older_than_idempotency_window_finds_the_invoice(uid: str) -> None:
    fake = FakeStripe()
    t = StripeTarget(api_key="sk_test_concord", api_base=fake.server.url)
    try:
        rec = invoice_cmd(uid, issued_at=int(time.time() * 1000) - 2 * 86_400_000)
        t.apply(cmd(rec))
        fake.replayed.clear()  # Stripe has forgotten the keys
        del fake.items[sorted(fake.items)[-1]]  # the last line never made it
        again = t.apply(cmd(rec))
        assert again.outcome == APPLIED and len(fake.invoices) == 1 and len(fake.items) == 2
        assert t.apply(cmd(rec)).outcome == DUPLICATE and len(fake.items) == 2
        assert any(r.path == "/v1/invoices/search" for r in fake.server.requests)
    finally:
        t.close()
        fake.server.close()


def test_stripe_and_http_failure_classes(uid: str) -> None:
    fake = FakeStripe()
    t = StripeTarget(api_key="sk_test_concord", api_base=fake.server.url)
    rcv = Receiver()
    h = HttpTarget(rcv.server.url)
    try:
        c = cmd(invoice_cmd(uid))
        for status, kind in ((500, TransientError), (429, TransientError), (401, FatalError)):
            for target, server in ((t, fake.server), (h, rcv.server)):
                server.fail_next.append(status)
                with pytest.raises(kind, match=str(status)):
                    target.apply(c)
        with pytest.raises(PermanentError, match="No such customer: 'cus_gone'"):
            t.apply(cmd(invoice_cmd(uid, customer="cus_gone")))
        dead = HttpTarget("http://127.0.0.1:9", timeout=1)
        with pytest.raises(TransientError, match="failed"):
            dead.apply(c)
        assert h.apply(c).outcome == APPLIED and h.apply(c).outcome == DUPLICATE
    finally:
        t.close()
        fake.server.close()
        rcv.server.close()


# ---- the consumer's handling, without a broker -----------------------------------------------------
def origin(rec: dict[str, Any] | bytes, offset: int = 0) -> Origin:
    value = rec if isinstance(rec, bytes) else CODEC.encode("command", rec)
    return Origin("commands.billing", 0, offset, b"k", value)


def test_retry_policy_doubles_and_caps() -> None:
    p = RetryPolicy(initial=0.2, maximum=10.0, attempts=8)
    assert [p.delay(n) for n in range(1, 9)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert p.delay(1, hint=30.0) == 10.0 and p.delay(3, hint=1.5) == 1.5


def test_adapter_retries_transient_failures_then_applies(uid: str) -> None:
    fake = FakeStripe()
    fake.server.fail_next.extend([500, 503])
    a = Adapter("127.0.0.1:1", StripeTarget(api_key="sk_test_concord", api_base=fake.server.url), ["billing"],
                NAMES, retry=FAST, report_outcomes=False)  # no broker here: outcomes are tested on the broker
    before = REGISTRY.get_sample_value("concord_adapter_commands_total",
                                       {"target": "stripe", "type": "create_invoice", "outcome": "retried"}) or 0
    try:
        rec = invoice_cmd(uid)
        started = time.monotonic()
        assert a.handle(origin(rec)) == APPLIED
        took = time.monotonic() - started
        posts = [r for r in fake.server.requests if r.path == "/v1/invoices"]
        assert [r.key for r in posts] == [rec["command_id"]] * 3
        assert len(fake.created_for(rec["command_id"])) == 1
        assert a.summary.counts == {"retried": 2, "applied": 1}
        assert 0.03 <= took < 2.0  # waited 0.01 + 0.02 s between attempts
        assert REGISTRY.get_sample_value("concord_adapter_commands_total", {
            "target": "stripe", "type": "create_invoice", "outcome": "retried"}) == before + 2
    finally:
        a.target.close()
        fake.server.close()


def test_adapter_gives_up_without_committing_and_stops_on_fatal(uid: str) -> None:
    rcv = Receiver()
    a = Adapter("127.0.0.1:1", HttpTarget(rcv.server.url), ["dispatch"], NAMES, retry=FAST,
                report_outcomes=False)
    try:
        rcv.server.fail_next.extend([503] * FAST.attempts)
        with pytest.raises(AdapterError, match="gave up after 4 attempts.*not committed"):
            a.handle(origin(invoice_cmd(uid)))
        rcv.server.fail_next.append(403)
        with pytest.raises(AdapterError, match="403"):
            a.handle(origin(invoice_cmd(uid)))
        a.produce_timeout = 1.0
        with pytest.raises(AdapterError, match="could not publish the dead letter.*not committed"):
            a.handle(origin(b"\xc3\x01garbage"))  # no broker to take the dead letter: not committed
    finally:
        rcv.server.close()


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["adapters", "--target", "stripe", "--topics", "dispatch"]) == 2
    assert cli.main(["adapters", "--target", "sandbox", "--topics", "billing,warehouse"]) == 2
    assert cli.main(["adapters", "--target", "http", "--max-attempts", "0"]) == 2
    err = capsys.readouterr().err
    assert "serves billing only" in err and "warehouse" in err


# ---- on the broker ---------------------------------------------------------------------------------
def start_group_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commit the group's offsets at today's end of ``topic``, so a run sees only what this test produces."""
    start_at_end(bootstrap, group, [topic])


@pytest.mark.broker
def test_redelivered_command_has_one_effect_and_bad_bytes_do_not_stop(broker: Any, uid: str, tmp_path: Any,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bs = broker.bootstrap_servers
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bs)
    group, db = f"adapters-{uid}", str(tmp_path / "sandbox.db")
    start_group_at_end(bs, group, "commands.billing")
    names = deployment(bs, f"concord-test-{uid}")  # the adapter raises rejections on this deployment's queues
    inv = invoice_cmd(uid)
    void = command("void_invoice", {"invoice_id": f"in_none_{uid}", "job_id": f"job-{uid}", "reason": "x"}, uid,
                   entity="invoice")
    key = inv["entity_id"].encode()
    value = CODEC.encode("command", inv)
    produce(bs, [("commands.billing", key, b"not avro at all"), *[("commands.billing", key, value)] * 3,
                 ("commands.billing", void["entity_id"].encode(), CODEC.encode("command", void))])
    since = end_offsets(bs, [names.exceptions("revenue-ops"), "deadletter.commands.billing"])
    args = ["adapters", "--target", "sandbox", "--topics", "billing", "--db", db, "--once", "--group", group,
            "--app-id", names.app_id]
    started = time.monotonic()
    assert cli.main(args) == 0
    first_run = time.monotonic() - started
    err = capsys.readouterr().err
    assert "1 applied, 2 duplicate, 1 rejected, 0 retried, 1 undecodable" in err, err
    assert "undecodable record at commands.billing" in err
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM effects WHERE command_id = ?", (inv["command_id"],)).fetchone() == (1,)
        assert c.execute("SELECT count(*), sum(amount_cents) FROM invoices").fetchone() == (1, 5990)
    def dead(x: Any) -> bool:
        return x.topic == "deadletter.commands.billing" and x.record["original_value"] == b"not avro at all"

    got = read_until(bs, since, lambda g: any(x.record and x.record.get("entity_id") == void["entity_id"] for x in g)
                     and any(dead(x) for x in g), timeout=20)
    dl = next(x for x in got if dead(x))
    assert dl.record["stage"] == "decode" and dl.headers["concord-src-topic"] == b"commands.billing"
    exc = next(x.record for x in got if x.record and x.record.get("entity_id") == void["entity_id"])
    assert exc["exception_id"] == stable_id("command_rejected", void["command_id"])
    assert exc["reason_code"] == "command_rejected" and exc["owner"] == "revenue-ops"
    assert f"no invoice in_none_{uid} to void" in exc["message"] and exc["original"]["topic"] == "commands.billing"
    # committed: a second run with the same group has nothing to do
    assert cli.main(args) == 0
    assert "0 applied, 0 duplicate, 0 rejected" in capsys.readouterr().err
    print(f"first --once run: {first_run:.2f}s")


@pytest.mark.broker
def test_stripe_adapter_retries_and_rejects_on_the_broker(broker: Any, uid: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bs = broker.bootstrap_servers
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bs)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_from_env")
    fake = FakeStripe()
    fake.server.fail_next.append(500)
    group = f"adapters-stripe-{uid}"
    start_group_at_end(bs, group, "commands.billing")
    names = deployment(bs, f"concord-test-{uid}")
    good, bad = invoice_cmd(uid), invoice_cmd(uid, customer="cus_missing")
    produce(bs, [("commands.billing", r["entity_id"].encode(), CODEC.encode("command", r)) for r in (bad, good)])
    since = end_offsets(bs, [names.exceptions("revenue-ops"), "deadletter.commands.billing"])
    try:
        rc = cli.main(["adapters", "--target", "stripe", "--topics", "billing", "--base-url", fake.server.url,
                       "--once", "--group", group, "--backoff", "0.05", "--max-backoff", "0.2",
                       "--app-id", names.app_id])
    finally:
        fake.server.close()
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 applied, 0 duplicate, 1 rejected, 1 retried, 0 undecodable" in err, err
    assert len(fake.created_for(good["command_id"])) == 1 and not fake.created_for(bad["command_id"])
    assert {r.headers["authorization"] for r in fake.server.requests} == {"Bearer sk_test_from_env"}
    want = stable_id("command_rejected", bad["command_id"])
    got = read_until(bs, since, lambda g: any(x.record and x.record["exception_id"] == want for x in g), timeout=20)
    exc = next(x.record for x in got if x.record and x.record["exception_id"] == want)
    assert exc["message"].startswith(f"stripe rejected create_invoice {bad['command_id']}")
    assert "No such customer: 'cus_missing'" in exc["message"] and exc["trace_id"] == bad["trace_id"]
    assert (exc["severity"], exc["backup_owner"], exc["customer_id"]) == ("high", "finance", f"acct-{uid}")
    assert CODEC.decode(exc["original"]["value"])[1]["command_id"] == bad["command_id"]
