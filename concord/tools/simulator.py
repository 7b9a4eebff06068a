"""A simulated business: customers, deals, jobs, invoices and payments over a month, with injected faults.

``business(rng, customers, days, start)`` is a valid history (what the systems really did, in order);
``Simulator`` adds the faults real integrations see and publishes the result to the broker.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from concord.contracts import events as ev
from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.exceptions import BrokerError
from concord.runtime.producer import new_producer

DAY = 86_400_000
HOUR = 3_600_000
SKUS = ("SVC-INSTALL", "SVC-REPAIR", "SVC-MAINT", "SVC-INSPECT", "HW-BOILER", "HW-PUMP", "HW-THERMO", "PLAN-ANNUAL")
UNMAPPED = ("SVC-INSTAL", "HW-BOILER-XL", "PLAN-MONTHLY")
NAMES = ("Acme", "Birch", "Cobalt", "Dunmore", "Elm", "Fairway", "Granite", "Harbor", "Iris", "Juniper", "Keystone",
         "Lumen", "Maple", "Northgate", "Oakridge", "Pinecrest", "Quarry", "Riverside", "Summit", "Tidewater")

# Fault rates per event (duplicates, reordering, gaps) or per record published (bad bytes, invalid records).
DEFAULT_FAULTS = {
    "missing_billing_account": 0.05,  # per customer
    "missing_billing_terms": 0.02,  # per customer
    "unmapped_sku": 0.04,  # per deal line
    "duplicate": 0.03,
    "out_of_order": 0.03,
    "sequence_gap": 0.01,
    "undecodable": 0.005,
    "schema_invalid": 0.005,
    # Losses only a closed loop catches: none unless asked for (LOSSES), so other histories stay as they were.
    "lost_invoice": 0.0,
    "unbilled_job": 0.0,
    "amount_changed": 0.0,
}
# The losses of the demo's month, per billable deal or completed job.
LOSSES = {
    "lost_invoice": 0.03,  # billing takes create_invoice for an on_close deal and silently never creates it
    "unbilled_job": 0.04,  # dispatch completes a job that nobody ever invoices
    "amount_changed": 0.01,  # billing creates the invoice with a different amount than it was asked for
}
CRM_FAULTS = {"dropped": 0.03, "late": 0.03}  # per "paid" update_deal_billing_status the simulated CRM receives


@dataclass
class Planned:
    """One record the simulator will publish, and why (``fault`` is None for a clean event)."""

    topic: str
    key: bytes
    value: bytes
    fault: str | None
    customer_id: str | None
    event: dict[str, Any] | None = None


@dataclass
class Published:
    """Where a planned record landed."""

    topic: str
    partition: int
    offset: int
    fault: str | None
    customer_id: str | None


class _Seq:
    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def __call__(self, entity_id: str) -> int:
        self.n[entity_id] = self.n.get(entity_id, 0) + 1
        return self.n[entity_id]


def business(rng: random.Random, customers: int, days: int, start: int, prefix: str = "",
             faults: dict[str, float] | None = None,
             injected: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """A valid history of canonical events, sorted by when they happened.

    ``injected`` (when given) receives the ids of the losses put in: deals whose invoice billing lost, jobs
    nobody invoiced, invoices billed with another amount, jobs billing invoiced late.
    """
    rates = {**DEFAULT_FAULTS, **(faults or {})}
    # The losses draw from their own stream, so the rest of a seed's history stays what it always was.
    # Seeded from the main stream's state without drawing from it (int and tuple hashes are not salted), so the
    # same seed loses the same things whatever the prefix.
    lossy = random.Random(hash(rng.getstate()[:2]))  # not the tuple's None: its hash is its address before 3.12
    losses = injected if injected is not None else {}
    for kind in ("lost_invoice", "unbilled_job", "amount_changed", "late_invoice"):
        losses.setdefault(kind, [])
    seq = _Seq()
    out: list[dict[str, Any]] = []

    def emit(entity: str, entity_id: str, payload: dict[str, Any] | None, cid: str | None, at: int,
             op: str = "update") -> None:
        n = seq(entity_id)
        out.append(ev.change_event(entity, entity_id, n, payload, cid, at=at, op="create" if n == 1 else op,
                                   vendor="simulator", event_id=f"{prefix}{entity}:{entity_id}:{n}"))

    for i in range(customers):
        cid = f"{prefix}cust-{i:04d}"
        name = f"{rng.choice(NAMES)} {rng.choice(('Heating', 'Plumbing', 'Property', 'Facilities'))} {i}"
        domain = f"{name.split()[0].lower()}{i}.example"
        has_account = rng.random() >= rates["missing_billing_account"]
        policy = rng.choice(("on_close", "on_completion"))
        cust = ev.customer(name, email=f"ap@{domain}", account=f"acct_{i:04d}" if has_account else None,
                           terms=None if rng.random() < rates["missing_billing_terms"] else "net_30", policy=policy,
                           external_ids={"stripe": f"cus_{i:04d}"})
        t = start + rng.randrange(0, DAY)
        emit("customer", cid, cust, cid, t)
        if rng.random() < 0.2:
            emit("customer", cid, {**cust, "email": f"billing@{domain}"}, cid, t + rng.randrange(DAY, days * DAY))
        billable = bool(cust["billing_account_id"] and cust["billing_terms"])
        for d in range(rng.choice((1, 1, 2, 3))):
            deal_id = f"{prefix}deal-{i:04d}-{d}"
            lines = [ev.line(rng.choice(UNMAPPED) if rng.random() < rates["unmapped_sku"] else rng.choice(SKUS),
                             rng.randint(1, 3), rng.choice((9_900, 25_000, 120_000)))
                     for _ in range(rng.randint(1, 3))]
            mapped = all(ln["sku"] in SKUS for ln in lines)
            t0 = start + rng.randrange(0, max(1, days - 7) * DAY)
            emit("deal", deal_id, ev.deal("open", lines, name=f"{name} #{d}"), cid, t0)
            fate = rng.random()
            t1 = t0 + rng.randrange(HOUR, 3 * DAY)
            if fate < 0.2:
                emit("deal", deal_id, ev.deal("closed_lost", lines, name=f"{name} #{d}"), cid, t1)
                continue
            if fate < 0.3:
                continue  # still open at the end of the month
            emit("deal", deal_id, ev.deal("closed_won", lines, name=f"{name} #{d}", closed_at=t1), cid, t1)
            if not (billable and mapped):
                continue  # stuck until an owner fixes the data: nothing downstream happens
            if policy == "on_close":
                inv_id = f"{prefix}inv-{i:04d}-{d}"
                if lossy.random() < rates["lost_invoice"]:
                    losses["lost_invoice"].append(deal_id)
                    continue
                changed = lossy.random() < rates["amount_changed"]
                if changed:
                    losses["amount_changed"].append(inv_id)
                _bill(emit, rng, inv_id, lines, cid, t1, deal_id=deal_id, prefix=prefix, changed=changed)
            else:
                _work(emit, rng, f"{prefix}job-{i:04d}-{d}", deal_id, lines, cid, t1, prefix=prefix,
                      unbilled=lossy.random() < rates["unbilled_job"], losses=losses)
    out.sort(key=lambda e: (e["occurred_at"], e["entity_id"], e["seq"]))
    return out


def _work(emit: Callable[..., None], rng: random.Random, job_id: str, deal_id: str, lines: list[dict[str, Any]],
          cid: str, t: int, prefix: str, unbilled: bool = False, losses: dict[str, list[str]] | None = None) -> None:
    when = t + rng.randrange(DAY, 4 * DAY)
    emit("job", job_id, ev.job("scheduled", lines, deal_id=deal_id, scheduled_for=when), cid, t + HOUR)
    if rng.random() < 0.1:
        emit("job", job_id, ev.job("cancelled", lines, deal_id=deal_id, scheduled_for=when), cid, when - HOUR)
        return
    emit("job", job_id, ev.job("dispatched", lines, deal_id=deal_id, scheduled_for=when), cid, when)
    done = when + rng.randrange(HOUR, 6 * HOUR)
    emit("job", job_id, ev.job("completed", lines, deal_id=deal_id, scheduled_for=when, completed_at=done), cid, done)
    if unbilled:
        if losses is not None:
            losses["unbilled_job"].append(job_id)
        return  # the work was done and nobody invoices it
    inv_id = f"{prefix}inv-{job_id.removeprefix(prefix).removeprefix('job-')}"
    late, cancel = rng.random() < 0.1, rng.random() < 0.05  # drawn in the order they always were
    if late and losses is not None:
        losses["late_invoice"].append(job_id)  # billing invoices the job after on_time_invoice_hours
    issued = _bill(emit, rng, inv_id, lines, cid, done, job_id=job_id, prefix=prefix, late=late, cancel=cancel)
    if issued is not None and issued < 0:  # cancelled after invoicing: dispatch cancels, billing voids
        emit("job", job_id, ev.job("cancelled", lines, deal_id=deal_id, scheduled_for=when, completed_at=done), cid,
             -issued + HOUR)
        emit("invoice", inv_id, ev.invoice("void", lines, job_id=job_id, issued_at=-issued), cid, -issued + 2 * HOUR)


def _bill(emit: Callable[..., None], rng: random.Random, inv_id: str, lines: list[dict[str, Any]], cid: str,
          t: int, *, deal_id: str | None = None, job_id: str | None = None, prefix: str = "", late: bool = False,
          cancel: bool = False, changed: bool = False) -> int | None:
    """Invoice and (usually) payment; returns the issue time, negated when the work is cancelled afterwards."""
    issued = t + rng.randrange(10 * 60_000, (72 if late else 20) * HOUR)
    if late:
        issued = max(issued, t + 50 * HOUR)
    inv: dict[str, Any] = {"deal_id": deal_id, "job_id": job_id, "issued_at": issued, "due_at": issued + 30 * DAY}
    if changed:  # billing applied the command with another amount than it was asked for
        inv["amount_due_cents"] = ev.total(lines) + max(5_000, ev.total(lines) // 10)
    emit("invoice", inv_id, ev.invoice("draft", lines, **{**inv, "issued_at": None}), cid, issued - 10 * 60_000)
    emit("invoice", inv_id, ev.invoice("open", lines, **inv), cid, issued)
    if cancel:
        return -issued
    pay_id = f"{prefix}pay-{inv_id.removeprefix(prefix).removeprefix('inv-')}"
    amount = ev.total(lines)
    paid_at = issued + rng.randrange(HOUR, 10 * DAY)
    fate = rng.random()
    if fate < 0.15:
        emit("payment", pay_id, ev.payment("failed", inv_id, amount, failure_reason="card_declined"), cid, paid_at)
        if fate < 0.07:
            return issued  # still failing at the end of the month
        paid_at += 2 * DAY
        emit("payment", pay_id, ev.payment("succeeded", inv_id, amount, attempt=2), cid, paid_at)
    else:
        emit("payment", pay_id, ev.payment("succeeded", inv_id, amount), cid, paid_at)
    emit("invoice", inv_id, ev.invoice("paid", lines, **inv, amount_paid_cents=amount), cid, paid_at + 60_000)
    return issued


class Simulator:
    """A month of a field-service business's changes, with faults, ready to publish."""

    def __init__(self, customers: int = 200, days: int = 30, seed: int = 7, start: int | None = None,
                 faults: dict[str, float] | None = None, prefix: str = "") -> None:
        self.customers, self.days, self.seed, self.prefix = customers, days, seed, prefix
        self.start = start if start is not None else 1_767_225_600_000  # 2026-01-01T00:00Z
        self.faults = {**DEFAULT_FAULTS, **(faults or {})}
        self.codec = Codec()
        self.injected: dict[str, list[str]] = {}  # the losses put in: kind -> entity ids (filled by history())

    def history(self) -> list[dict[str, Any]]:
        """The valid history under the faults (same seed, same history)."""
        self.injected = {}
        return business(random.Random(self.seed), self.customers, self.days, self.start, self.prefix, self.faults,
                        self.injected)

    def records(self) -> Iterator[Planned]:
        """The history as it reaches Concord: duplicated, reordered, gapped, with bad bytes mixed in."""
        rng = random.Random(self.seed + 1)
        plan: list[Planned] = []
        gapped: set[str] = set()
        last_at: dict[bytes, int] = {}  # entity key -> index of its latest record in the plan
        later: list[tuple[int, Planned]] = []  # duplicates waiting to be redelivered after n more records
        for e in self.history():
            topic = topics.changes_topic(e["source_system"], e["entity_type"])
            p = Planned(topic, e["entity_id"].encode(), self.codec.encode("change_event", e), None, e["customer_id"], e)
            if e["entity_id"] in gapped:
                p.fault = "behind_gap"
            elif e["seq_contiguous"] and e["seq"] > 1 and rng.random() < self.faults["sequence_gap"]:
                gapped.add(e["entity_id"])
                continue  # the source lost this one: everything after it for the entity waits
            plan.append(p)
            j = last_at.get(p.key)
            last_at[p.key] = len(plan) - 1
            if j is not None and p.fault is None and plan[j].fault is None and rng.random() < self.faults[
                    "out_of_order"]:
                plan[j], plan[-1] = plan[-1], plan[j]  # the newer change overtakes the older one
                plan[j].fault = "out_of_order"
            if rng.random() < self.faults["duplicate"]:
                later.append((rng.randrange(0, 30), Planned(p.topic, p.key, p.value, "duplicate", p.customer_id,
                                                             p.event)))
            due = [d for n, d in later if n <= 0]
            later = [(n - 1, d) for n, d in later if n > 0]
            plan += due
            if rng.random() < self.faults["undecodable"]:
                plan.append(Planned(topic, p.key, b"\x00garbage" + rng.randbytes(12), "undecodable", None))
            if rng.random() < self.faults["schema_invalid"]:
                bad = dict(e, event_id=e["event_id"] + ":bad", entity_id=e["entity_id"] + "-bad", trace_id="bad:"
                           + e["event_id"], payload=None, op="create")  # a create with no payload breaks the contract
                plan.append(Planned(topic, bad["entity_id"].encode(), self.codec.encode("change_event", bad),
                                    "schema_invalid", e["customer_id"], bad))
        plan += [d for _, d in later]
        return iter(plan)

    def publish(self, bootstrap: str, records: list[Planned],
                progress: Callable[[int, int], None] | None = None) -> list[Published]:
        """Publish ``records`` in order and return where each landed (from the broker's acknowledgements)."""
        producer = new_producer(bootstrap)
        landed: list[Published | None] = [None] * len(records)
        errors: list[str] = []

        def delivered(i: int, p: Planned) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(f"{p.topic}: {err}")
                else:
                    landed[i] = Published(msg.topic(), msg.partition(), msg.offset(), p.fault, p.customer_id)
            return cb

        for i, p in enumerate(records):
            while True:
                try:
                    producer.produce(p.topic, key=p.key, value=p.value, on_delivery=delivered(i, p))
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            if progress and i % 500 == 0:
                progress(i, len(records))
        left = producer.flush(60)
        if left or errors:
            raise BrokerError(f"{left} record(s) unacknowledged, {len(errors)} failed: {errors[:3]}")
        if progress:
            progress(len(records), len(records))
        return [p for p in landed if p is not None]


class Echoes:
    """Publishes the simulated target systems' own change events, some only after a delay."""

    def __init__(self, bootstrap: str) -> None:
        self.codec = Codec()
        self.producer = new_producer(bootstrap)
        self._later: list[tuple[float, int, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._n = 0
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="concord-sim-echoes", daemon=True)
        self._thread.start()

    def send(self, event: dict[str, Any], delay_s: float = 0.0) -> None:
        """Publish ``event`` on its changes topic now, or ``delay_s`` seconds from now."""
        with self._lock:
            self._n += 1
            heapq.heappush(self._later, (time.monotonic() + delay_s, self._n, event))

    @property
    def pending(self) -> int:
        """Echoes not yet published."""
        with self._lock:
            return len(self._later)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            due = []
            with self._lock:
                while self._later and self._later[0][0] <= time.monotonic():
                    due.append(heapq.heappop(self._later)[2])
            for e in due:
                self.producer.produce(topics.changes_topic(e["source_system"], e["entity_type"]),
                                      key=e["entity_id"].encode(), value=self.codec.encode("change_event", e))
            if due:
                self.producer.flush(30)
                self.published += len(due)

    def close(self) -> None:
        """Stop; echoes still waiting are not published."""
        self._stop.set()
        self._thread.join(5)
        self.producer.flush(10)


class LossyTarget:
    """The simulated target systems: the sandbox target, but losing what the simulator says they lose.

    billing reports create_invoice applied for the deals whose invoice the history lost, and does nothing; the CRM
    drops a share of update_deal_billing_status silently (reported applied, never echoed) and echoes another share
    only after ``late_s``. Everything else is applied by the sandbox, whose echo plays the CRM's own feed (billing's
    and dispatch's feeds are the simulated history itself).
    """

    name = "sandbox"

    def __init__(self, db: Any, echoes: Echoes, lost_deals: set[str], seed: int = 7, late_s: float = 12.0,
                 rates: dict[str, float] | None = None, canonical: Callable[[str], str] | None = None) -> None:
        from connectors.outbound.sandbox import SandboxTarget

        self.rates = {**CRM_FAULTS, **(rates or {})}
        self.seed, self.late_s, self.echoes, self.lost_deals = seed, late_s, echoes, lost_deals
        # native feeds: a native deal / invoice id -> the simulator's, so the same losses fall on the same records
        self.canonical = canonical or (lambda native: native)
        self.inner = SandboxTarget(db, echo=self._echo, echo_systems=("crm",))
        self.types = self.inner.types
        self.dropped: list[str] = []  # command ids reported applied and never carried out
        self.late: list[str] = []  # command ids whose echo comes after the confirmation deadline

    def apply(self, cmd: Any) -> Any:
        """Apply ``cmd`` as the simulated target would (see the class docstring)."""
        from connectors.outbound.base import APPLIED, Result

        if cmd.type == "create_invoice" and cmd.entity_type == "deal" and self.canonical(cmd.entity_id) in \
                self.lost_deals:
            self.dropped.append(cmd.command_id)
            return Result(APPLIED, f"inv_{cmd.command_id[:24]}")  # it says so, and never does it
        if cmd.type == "void_invoice":  # billing's own feed (the history) voids it; the sandbox holds no invoices
            return Result(APPLIED, str(cmd.payload["invoice_id"]))
        if cmd.type == "update_deal_billing_status" and cmd.payload.get("billing_status") == "paid":
            # only the last update a deal gets: a later one would mask the loss of an earlier one
            from concord.domain.ids import command_id

            inv = str(cmd.payload.get("invoice_id"))
            key = command_id(cmd.type, cmd.target_system, cmd.entity_type, self.canonical(cmd.entity_id), "paid",
                             self.canonical(inv)) if inv != "None" else cmd.command_id
            draw = random.Random(f"{self.seed}:{key}").random()
            if draw < self.rates["dropped"]:
                self.dropped.append(cmd.command_id)
                return Result(APPLIED, str(cmd.payload.get("deal_id")))
            if draw < self.rates["dropped"] + self.rates["late"]:
                self.late.append(cmd.command_id)
        return self.inner.apply(cmd)

    def _echo(self, event: dict[str, Any]) -> None:
        late = event["caused_by_command_id"] in self.late
        self.echoes.send(event, self.late_s if late else 0.0)

    def close(self) -> None:
        """Close the sandbox database."""
        self.inner.close()
