"""CRM targets: Salesforce (simple-salesforce) and HubSpot (hubspot-api-client) against loopback servers.

The vendors' own libraries talk to real HTTP servers on 127.0.0.1 (Salesforce over TLS, as the library
only speaks https, with a certificate made for the test) that speak enough of the REST APIs; one CRM
contract runs against them and against the sandbox and HTTP targets.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import random
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kafka_helpers import deployment, end_offsets, produce, read_until
from test_adapters import Receiver, start_group_at_end

from concord.contracts.codec import Codec
from concord.domain.rules import stable_id
from concord.tools import cli
from connectors.outbound.base import APPLIED, DUPLICATE, Command, FatalError, PermanentError, TransientError
from connectors.outbound.http_target import HttpTarget
from connectors.outbound.hubspot_target import HubSpotTarget
from connectors.outbound.salesforce_target import SalesforceTarget
from connectors.outbound.sandbox import SandboxTarget

CODEC = Codec()
SF_VERSION = "59.0"
SF_PATH = f"/services/data/v{SF_VERSION}/sobjects/Opportunity/"
STATUSES = {"invoiced", "paid", "void", "not_invoiced"}  # the picklist both fakes restrict billing_status to


# ---- a loopback JSON server (optionally TLS) that records requests --------------------------------
@dataclass
class Req:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Server:
    respond: Callable[[Req], tuple[int, Any]]
    tls: ssl.SSLContext | None = None
    requests: list[Req] = field(default_factory=list)
    fail_next: list[tuple[int, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer, lock = self, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                u = urlsplit(self.path)
                req = Req(self.command, u.path, parse_qs(u.query), {k.lower(): v for k, v in self.headers.items()},
                          self.rfile.read(n))
                with lock:  # one request at a time: the fakes' read-check-write is atomic, like the vendor's
                    outer.requests.append(req)
                    status, doc = outer.fail_next.pop(0) if outer.fail_next else outer.respond(req)
                data = b"" if status == 204 else json.dumps(doc).encode()
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def writes(self, deal_id: str) -> list[Req]:
        return [r for r in self.requests if r.method == "PATCH" and r.path.endswith(f"/{deal_id}")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    """A self-signed certificate for 127.0.0.1: the server's context and the CA file the client trusts."""
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
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx, str(d / "cert.pem")


# ---- Salesforce -----------------------------------------------------------------------------------
def sf_error(status: int, code: str, message: str, fields: list[str] | None = None) -> tuple[int, Any]:
    return status, [{"message": message, "errorCode": code, "fields": fields or []}]


class FakeSalesforce:
    """The sObject rows resource for Opportunity: GET (?fields=), PATCH (If-Unmodified-Since), bearer session."""

    def __init__(self, tls: ssl.SSLContext, session_id: str = "00Dsession!token") -> None:
        self.session_id = session_id
        self.rows: dict[str, dict[str, Any]] = {}
        self.clock = dt.datetime(2024, 5, 1, 10, 0, 0, tzinfo=dt.UTC)
        self.server = Server(self.respond, tls)

    def add(self, opp_id: str) -> None:
        self.rows[opp_id] = {"Id": opp_id, "Billing_Status__c": None, "Invoice_Id__c": None,
                             "Concord_Command_Id__c": None, "Concord_Command_Issued_At__c": None,
                             "LastModifiedDate": self._stamp()}

    def _stamp(self) -> str:
        self.clock += dt.timedelta(seconds=1)  # every change a second later: If-Unmodified-Since has 1 s resolution
        return self.clock.strftime("%Y-%m-%dT%H:%M:%S.000+0000")

    def respond(self, r: Req) -> tuple[int, Any]:
        if r.headers.get("authorization") != f"Bearer {self.session_id}":
            return sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if not r.path.startswith(SF_PATH):
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        opp_id = r.path[len(SF_PATH):]
        row = self.rows.get(opp_id)
        if row is None:
            return sf_error(404, "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: "
                                              f"{opp_id}")
        if r.method == "GET":
            wanted = r.query["fields"][0].split(",") if "fields" in r.query else list(row)
            return 200, {"attributes": {"type": "Opportunity", "url": r.path}, "Id": opp_id,
                         **{f: row[f] for f in wanted}}
        if r.method != "PATCH":
            return sf_error(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{r.method}' not allowed")
        since = r.headers.get("if-unmodified-since")
        modified = dt.datetime.strptime(row["LastModifiedDate"], "%Y-%m-%dT%H:%M:%S.%f%z")
        if since and modified > parsedate_to_datetime(since):
            return sf_error(412, "PRECONDITION_FAILED", "The entity has been modified since the specified date")
        body = r.json
        unknown = [k for k in body if k not in row or k in ("Id", "LastModifiedDate")]
        if unknown:
            return sf_error(400, "INVALID_FIELD", f"No such column '{unknown[0]}' on sobject of type Opportunity")
        if body.get("Billing_Status__c") not in STATUSES:
            return sf_error(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                            f"Billing Status: bad value for restricted picklist field: {body.get('Billing_Status__c')}",
                            ["Billing_Status__c"])
        row.update(body, LastModifiedDate=self._stamp())
        return 204, None


# ---- HubSpot --------------------------------------------------------------------------------------
def hs_error(status: int, category: str, message: str) -> tuple[int, Any]:
    return status, {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category}


class FakeHubSpot:
    """CRM v3 deals: GET /crm/v3/objects/deals/{id}?properties=, PATCH with {"properties": …}, bearer token."""

    PATH = "/crm/v3/objects/deals/"

    def __init__(self, token: str = "pat-na1-test") -> None:
        self.token = token
        self.deals: dict[str, dict[str, Any]] = {}
        self.server = Server(self.respond)

    def add(self, deal_id: str) -> None:
        self.deals[deal_id] = {"dealname": f"deal {deal_id}", "billing_status": None, "invoice_id": None,
                               "concord_command_id": None, "concord_command_issued_at": None}

    def respond(self, r: Req) -> tuple[int, Any]:
        if r.headers.get("authorization") != f"Bearer {self.token}":
            return hs_error(401, "INVALID_AUTHENTICATION", "Authentication credentials not found. This API supports "
                                                           "OAuth 2.0 authentication.")
        deal_id = r.path[len(self.PATH):] if r.path.startswith(self.PATH) else ""
        props = self.deals.get(deal_id)
        if props is None:
            return hs_error(404, "OBJECT_NOT_FOUND", f"Object not found.  objectId are usually numeric. ({deal_id})")
        if r.method == "PATCH":
            new = r.json["properties"]
            bad = [k for k in new if k not in props]
            if bad:
                return hs_error(400, "VALIDATION_ERROR", f'Property values were not valid: [{{"name":"{bad[0]}",'
                                                         f'"error":"PROPERTY_DOESNT_EXIST"}}]')
            if new.get("billing_status") not in STATUSES:
                return hs_error(400, "VALIDATION_ERROR", f"Property values were not valid: {new.get('billing_status')}"
                                                         " was not one of the allowed options")
            props.update(new)
        wanted = ",".join(r.query.get("properties") or props).split(",")  # ?properties=a,b or repeated
        now = "2024-05-01T10:00:00.000Z"
        return 200, {"id": deal_id, "properties": {k: props.get(k) for k in wanted}, "createdAt": now,
                     "updatedAt": now, "archived": False}


# ---- commands --------------------------------------------------------------------------------------
def crm_cmd(deal_id: str, status: str = "invoiced", invoice_id: str = "in_1", issued_at: int | None = None,
            key: str = "") -> Command:
    rec = {"command_id": stable_id("update_deal_billing_status", "crm", "deal", deal_id, status, invoice_id, key),
           "type": "update_deal_billing_status", "target_system": "crm", "customer_id": "acct-1",
           "entity_type": "deal", "entity_id": deal_id,
           "payload": json.dumps({"deal_id": deal_id, "billing_status": status, "invoice_id": invoice_id}),
           "caused_by": [f"ev-{deal_id}"], "trace_id": f"trace-{deal_id}",
           "issued_at": issued_at or int(time.time() * 1000), "source_occurred_at": None}
    return Command.from_record(rec)


def sf_id() -> str:
    return "006" + uuid.uuid4().hex[:15]


def hs_id() -> str:
    return str(random.randrange(10**9, 10**11))


# ---- one CRM contract, every target that serves commands.crm --------------------------------------
@dataclass
class Crm:
    name: str
    target: Any
    new_deal: Callable[[], str]  # a deal the system holds
    state: Callable[[str], tuple[Any, Any] | None]  # (billing_status, invoice_id) the system holds
    writes: Callable[[str], int]  # how many writes reached the deal
    server: Server | None = None


@pytest.fixture(params=["salesforce", "hubspot", "sandbox", "http"])
def crm(request: pytest.FixtureRequest, tmp_path: Path, tls: tuple[ssl.SSLContext, str]) -> Iterator[Crm]:
    if request.param == "salesforce":
        sf = FakeSalesforce(tls[0])

        def sf_new() -> str:
            sf.add(d := sf_id())
            return d

        t: Any = SalesforceTarget(instance_url=sf.server.url, session_id=sf.session_id, version=SF_VERSION,
                                  verify=tls[1])
        yield Crm("salesforce", t, sf_new, lambda d: (sf.rows[d]["Billing_Status__c"], sf.rows[d]["Invoice_Id__c"]),
                  lambda d: len(sf.server.writes(d)), sf.server)
        sf.server.close()
    elif request.param == "hubspot":
        hs = FakeHubSpot()

        def hs_new() -> str:
            hs.add(d := hs_id())
            return d

        t = HubSpotTarget(access_token=hs.token, host=hs.server.url)
        yield Crm("hubspot", t, hs_new, lambda d: (hs.deals[d]["billing_status"], hs.deals[d]["invoice_id"]),
                  lambda d: len(hs.server.writes(d)), hs.server)
        hs.server.close()
    elif request.param == "sandbox":
        db = tmp_path / "crm.db"
        t = SandboxTarget(db)

        def row(d: str) -> tuple[Any, Any] | None:
            with sqlite3.connect(db) as c:
                return c.execute("SELECT billing_status, invoice_id FROM deal_billing_statuses WHERE deal_id = ?",
                                 (d,)).fetchone()

        def sandbox_writes(d: str) -> int:
            with sqlite3.connect(db) as c:
                return c.execute("SELECT count(*) FROM effects WHERE entity_id = ?", (d,)).fetchone()[0]

        yield Crm("sandbox", t, sf_id, row, sandbox_writes)
    else:
        rcv = Receiver()
        t = HttpTarget(rcv.server.url)

        def last(d: str) -> tuple[Any, Any] | None:
            done = [o["doc"]["payload"] for o in rcv.applied.values() if o["doc"]["payload"]["deal_id"] == d]
            return (done[-1]["billing_status"], done[-1]["invoice_id"]) if done else None

        yield Crm("http", t, sf_id, last, lambda d: sum(1 for o in rcv.applied.values()
                                                        if o["doc"]["payload"]["deal_id"] == d))
        rcv.server.close()
    t.close()


def test_crm_contract_one_effect_per_command_id(crm: Crm) -> None:
    deal = crm.new_deal()
    c = crm_cmd(deal)
    first, again = crm.target.apply(c), crm.target.apply(c)
    assert first.outcome == APPLIED and first.ref == (deal if crm.name != "http" else "obj_1")  # http: receiver's id
    assert again.outcome == DUPLICATE and crm.writes(deal) == 1
    assert crm.state(deal) == ("invoiced", "in_1")


def test_crm_contract_redelivered_batch_changes_nothing(crm: Crm) -> None:
    deal = crm.new_deal()
    now = int(time.time() * 1000)
    batch = [crm_cmd(deal, "invoiced", issued_at=now), crm_cmd(deal, "paid", issued_at=now + 5)]
    assert [crm.target.apply(c).outcome for c in batch] == [APPLIED, APPLIED]
    assert [crm.target.apply(c).outcome for c in batch] == [DUPLICATE, DUPLICATE]  # the uncommitted batch again
    assert crm.writes(deal) == 2 and crm.state(deal) == ("paid", "in_1")


def test_crm_contract_invalid_commands_are_permanent_and_send_nothing(crm: Crm) -> None:
    deal = crm.new_deal()
    before = len(crm.server.requests) if crm.server else 0
    no_status = crm_cmd(deal)
    no_status = Command(**{**no_status.__dict__, "payload": {"deal_id": deal, "invoice_id": "in_1"}})
    with pytest.raises(PermanentError, match="missing billing_status"):
        crm.target.apply(no_status)
    with pytest.raises(PermanentError, match="not JSON"):
        Command.from_record({**CODEC_RECORD, "payload": "{"})
    if crm.server:  # the vendor targets serve CRM only, and check the id before it reaches a URL
        with pytest.raises(PermanentError, match="does not handle 'create_job'"):
            crm.target.apply(Command(**{**crm_cmd(deal).__dict__, "type": "create_job",
                                        "payload": {"deal_id": deal, "customer_id": "acct-1"}}))
        with pytest.raises(PermanentError, match="is not a"):
            crm.target.apply(crm_cmd("../../sobjects/Account/001x"))
        assert len(crm.server.requests) == before


CODEC_RECORD = {"command_id": "cmd_x", "type": "update_deal_billing_status", "target_system": "crm",
                "issued_at": 1}


# ---- vendor specifics: refusals, failure classes, ordering, the requests themselves ----------------
VENDORS = pytest.mark.parametrize("crm", ["salesforce", "hubspot"], indirect=True)  # the two vendor fakes only


@VENDORS
def test_vendor_refusal_is_permanent_with_the_systems_words(crm: Crm) -> None:
    missing = sf_id() if crm.name == "salesforce" else hs_id()
    said = "external ID field does not exist" if crm.name == "salesforce" else "Object not found"
    with pytest.raises(PermanentError, match=f"404.*{said}.*{missing}"):
        crm.target.apply(crm_cmd(missing))
    deal = crm.new_deal()
    said = "bad value for restricted picklist field: shipped" if crm.name == "salesforce" else \
        "shipped was not one of the allowed options"
    with pytest.raises(PermanentError, match=f"400.*{said}"):
        crm.target.apply(crm_cmd(deal, "shipped"))
    assert crm.state(deal) == (None, None)


@VENDORS
def test_vendor_failure_classes(crm: Crm) -> None:
    assert crm.server is not None
    deal = crm.new_deal()
    c = crm_cmd(deal)
    body: Any = [{"message": "Server Error", "errorCode": "SERVER_ERROR"}] if crm.name == "salesforce" else \
        {"status": "error", "message": "internal error", "category": "INTERNAL_ERROR"}
    for status, kind in ((500, TransientError), (503, TransientError), (429, TransientError), (401, FatalError)):
        crm.server.fail_next.append((status, body))
        with pytest.raises(kind, match=str(status)):
            crm.target.apply(c)
    crm.server.fail_next.append((200, {"id": deal, "properties": {}, "createdAt": "2024-05-01T10:00:00Z",
                                          "updatedAt": "2024-05-01T10:00:00Z", "archived": False})
                                   if crm.name == "hubspot" else (200, {"Id": deal}))
    crm.server.fail_next.append((503, body))  # the read passed, the write failed: the retry writes once
    with pytest.raises(TransientError):
        crm.target.apply(c)
    assert crm.target.apply(c).outcome == APPLIED and crm.target.apply(c).outcome == DUPLICATE
    assert crm.state(deal) == ("invoiced", "in_1")
    if crm.name == "salesforce":  # API limits come as 403 REQUEST_LIMIT_EXCEEDED; other 403s are fatal
        crm.server.fail_next.append(sf_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."))
        with pytest.raises(TransientError, match="REQUEST_LIMIT_EXCEEDED"):
            crm.target.apply(c)
        crm.server.fail_next.append(sf_error(403, "INSUFFICIENT_ACCESS", "insufficient access rights on object"))
        with pytest.raises(FatalError, match="insufficient access"):
            crm.target.apply(c)


@VENDORS
def test_vendor_older_command_never_overwrites_a_newer_one(crm: Crm) -> None:
    deal = crm.new_deal()
    now = int(time.time() * 1000)
    assert crm.target.apply(crm_cmd(deal, "paid", issued_at=now)).outcome == APPLIED
    assert crm.target.apply(crm_cmd(deal, "invoiced", issued_at=now - 1000)).outcome == DUPLICATE
    assert crm.state(deal) == ("paid", "in_1") and crm.writes(deal) == 1


def test_unreachable_vendors_are_transient(tls: tuple[ssl.SSLContext, str]) -> None:
    sf = SalesforceTarget(instance_url="https://127.0.0.1:9", session_id="x", verify=tls[1], timeout=2)
    hs = HubSpotTarget(access_token="x", host="http://127.0.0.1:9", timeout=2)
    for t, deal in ((sf, sf_id()), (hs, hs_id())):
        with pytest.raises(TransientError, match="did not answer"):
            t.apply(crm_cmd(deal))
        t.close()


def test_salesforce_requests(tls: tuple[ssl.SSLContext, str]) -> None:
    sf = FakeSalesforce(tls[0])
    t = SalesforceTarget(instance_url=sf.server.url, session_id=sf.session_id, version=SF_VERSION, verify=tls[1])
    try:
        sf.add(deal := sf_id())
        c = crm_cmd(deal, "paid", "in_42")
        t.apply(c)
        get, patch = sf.server.requests
        assert (get.method, get.path) == ("GET", SF_PATH + deal)
        assert get.query["fields"] == ["Concord_Command_Id__c,Concord_Command_Issued_At__c,LastModifiedDate"]
        assert (patch.method, patch.path) == ("PATCH", SF_PATH + deal)
        assert patch.headers["authorization"] == f"Bearer {sf.session_id}"
        assert patch.headers["sforce-call-options"] == f"client=concord:{c.command_id}"
        assert patch.headers["if-unmodified-since"] == format_datetime(dt.datetime(2024, 5, 1, 10, 0, 1,
                                                                                   tzinfo=dt.UTC), usegmt=True)
        assert patch.json == {"Billing_Status__c": "paid", "Invoice_Id__c": "in_42",
                              "Concord_Command_Id__c": f"concord:{c.command_id}",
                              "Concord_Command_Issued_At__c": c.issued_at}
    finally:
        t.close()
        sf.server.close()


def test_salesforce_concurrent_deliveries_write_once(tls: tuple[ssl.SSLContext, str]) -> None:
    """Four consumers deliver the same commands at once; If-Unmodified-Since turns the losers into retries."""
    sf = FakeSalesforce(tls[0])
    deals = [sf_id() for _ in range(3)]
    for d in deals:
        sf.add(d)
    cmds = [crm_cmd(d, "invoiced") for d in deals]
    outcomes: list[str] = []
    retried: list[int] = []

    def deliver() -> None:
        t = SalesforceTarget(instance_url=sf.server.url, session_id=sf.session_id, version=SF_VERSION, verify=tls[1])
        for c in cmds:
            for _ in range(10):  # what the consumer's backoff does with a TransientError
                try:
                    outcomes.append(t.apply(c).outcome)
                    break
                except TransientError:
                    retried.append(1)
                    time.sleep(0.01)
        t.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(outcomes) == sorted([APPLIED] * 3 + [DUPLICATE] * 9)
        accepted = [r for r in sf.server.requests if r.method == "PATCH"]
        assert len(accepted) == 3 + len(retried)  # every loser's PATCH was refused with 412
        assert [sf.rows[d]["Concord_Command_Id__c"] for d in deals] == [f"concord:{c.command_id}" for c in cmds]
        print(f"salesforce concurrency: {len(retried)} writes refused with 412 and retried")
    finally:
        sf.server.close()


def test_hubspot_requests() -> None:
    hs = FakeHubSpot()
    t = HubSpotTarget(access_token=hs.token, host=hs.server.url)
    hs.add(deal := hs_id())
    c = crm_cmd(deal, "invoiced", "in_7")
    try:
        t.apply(c)
        get, patch = hs.server.requests
        assert (get.method, get.path, get.query["properties"]) == \
            ("GET", f"/crm/v3/objects/deals/{deal}", ["concord_command_id", "concord_command_issued_at"])
        assert (patch.method, patch.path) == ("PATCH", f"/crm/v3/objects/deals/{deal}")
        assert patch.headers["authorization"] == f"Bearer {hs.token}"
        assert patch.json == {"properties": {"billing_status": "invoiced", "invoice_id": "in_7",
                                             "concord_command_id": f"concord:{c.command_id}",
                                             "concord_command_issued_at": str(c.issued_at)}}
    finally:
        hs.server.close()


# ---- configuration and the command line ------------------------------------------------------------
def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tls: tuple[ssl.SSLContext, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("SALESFORCE_INSTANCE_URL", "SALESFORCE_SESSION_ID", "SALESFORCE_USERNAME", "SALESFORCE_PASSWORD",
                "HUBSPOT_ACCESS_TOKEN", "CONCORD_HTTP_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FatalError, match="SALESFORCE_SESSION_ID"):
        SalesforceTarget()
    with pytest.raises(FatalError, match="HUBSPOT_ACCESS_TOKEN"):
        HubSpotTarget()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never reached: the target fails first
    assert cli.main(["adapters", "--target", "salesforce", "--topics", "crm", "--once"]) == 1
    assert cli.main(["adapters", "--target", "hubspot", "--topics", "crm", "--once"]) == 1
    assert cli.main(["adapters", "--target", "hubspot", "--topics", "crm,billing"]) == 2
    assert cli.main(["adapters", "--target", "salesforce", "--topics", "dispatch"]) == 2
    err = capsys.readouterr().err
    assert "needs SALESFORCE_INSTANCE_URL" in err and "needs HUBSPOT_ACCESS_TOKEN" in err
    assert err.count("serves crm only") == 2
    sf = FakeSalesforce(tls[0])
    monkeypatch.setenv("SALESFORCE_INSTANCE_URL", sf.server.url)
    monkeypatch.setenv("SALESFORCE_SESSION_ID", sf.session_id)
    t = SalesforceTarget(version=SF_VERSION, verify=tls[1])
    try:
        sf.add(deal := sf_id())
        assert t.apply(crm_cmd(deal)).outcome == APPLIED
        assert t.where == sf.server.url
    finally:
        t.close()
        sf.server.close()


@pytest.mark.broker
@pytest.mark.parametrize("vendor_name", ["salesforce", "hubspot"])
def test_crm_adapter_on_the_broker(vendor_name: str, broker: Any, uid: str, monkeypatch: pytest.MonkeyPatch,
                                   tls: tuple[ssl.SSLContext, str], capsys: pytest.CaptureFixture[str]) -> None:
    """``concord adapters --target <vendor> --topics crm``: applies, retries a 503, rejects with the vendor's words."""
    bs = broker.bootstrap_servers
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bs)
    monkeypatch.delenv("CONCORD_HTTP_BASE_URL", raising=False)
    if vendor_name == "salesforce":
        fake: Any = FakeSalesforce(tls[0])
        monkeypatch.setenv("SALESFORCE_INSTANCE_URL", fake.server.url)
        monkeypatch.setenv("SALESFORCE_SESSION_ID", fake.session_id)
        monkeypatch.setenv("SALESFORCE_API_VERSION", SF_VERSION)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls[1])
        good, missing = sf_id(), sf_id()
    else:
        fake = FakeHubSpot()
        monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", fake.token)
        monkeypatch.setenv("HUBSPOT_API_BASE", fake.server.url)
        good, missing = hs_id(), hs_id()
    fake.add(good)
    fake.server.fail_next.append((503, {"message": "down for maintenance"}))
    group = f"adapters-{vendor_name}-{uid}"
    start_group_at_end(bs, group, "commands.crm")
    names = deployment(bs, f"concord-test-{uid}")  # the adapter raises rejections on this deployment's queues
    recs = []
    for deal in (good, good, missing):  # the good one delivered twice
        c = crm_cmd(deal, key=uid)
        recs.append({**c.__dict__, "payload": json.dumps(c.payload), "source_occurred_at": None})
    produce(bs, [("commands.crm", r["entity_id"].encode(), CODEC.encode("command", r)) for r in recs])
    since = end_offsets(bs, [names.exceptions("revenue-ops")])
    try:
        rc = cli.main(["adapters", "--target", vendor_name, "--topics", "crm", "--once", "--group", group,
                       "--backoff", "0.05", "--max-backoff", "0.2", "--app-id", names.app_id])
    finally:
        fake.server.close()
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 applied, 1 duplicate, 1 rejected, 1 retried, 0 undecodable" in err, err
    assert len(fake.server.writes(good)) == 1
    want = stable_id("command_rejected", recs[2]["command_id"])
    got = read_until(bs, since, lambda g: any(x.record and x.record["exception_id"] == want for x in g), timeout=20)
    exc = next(x.record for x in got if x.record and x.record["exception_id"] == want)
    assert exc["message"].startswith(f"{vendor_name} rejected update_deal_billing_status")
    assert missing in exc["message"] and "404" in exc["message"]
