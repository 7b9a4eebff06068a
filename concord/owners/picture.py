"""A customer's picture across systems (deal → job → invoice → payment), money at risk, and source-system links."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from concord.domain.status import COLLECTION, invoice_paid, invoices_of
from concord.exceptions import ConfigError

LINKS_PATH = Path(__file__).resolve().parent.parent / "config" / "links.yaml"
SYSTEM_OF = {"customer": "crm", "deal": "crm", "job": "dispatch", "invoice": "billing", "payment": "billing"}


@dataclass(frozen=True)
class Step:
    """One record in a customer's chain: what it is, where it stands, what it is worth, where it lives."""

    kind: str
    entity_id: str
    position: str
    amount_cents: int | None
    currency: str | None
    link: str | None
    depth: int = 0


@dataclass(frozen=True)
class Links:
    """URL templates of the record in each source system ({id} is the record's id), from config/links.yaml."""

    entities: dict[str, str] = field(default_factory=dict)
    external: dict[str, str] = field(default_factory=dict)

    def of(self, entity_type: str, entity_id: str) -> str | None:
        """The record's address in its source system, or None when no template is configured."""
        template = self.entities.get(entity_type)
        return template.replace("{id}", _url_part(entity_id)) if template else None

    def external_ids(self, ids: dict[str, str]) -> list[tuple[str, str, str | None]]:
        """(system, id, address) for every id another system knows the customer by."""
        return [(k, v, self.external[k].replace("{id}", _url_part(v)) if k in self.external else None)
                for k, v in sorted(ids.items())]


def _url_part(value: str) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="")


def load_links(path: Path | None = None) -> Links:
    """The link templates; ConfigError names the file and what is wrong."""
    path = path or LINKS_PATH
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    entities, external = data.get("entities") or {}, data.get("external_ids") or {}
    for name, group in (("entities", entities), ("external_ids", external)):
        if not isinstance(group, dict) or not all(isinstance(v, str) and "{id}" in v for v in group.values()):
            raise ConfigError(f"{path}: {name}: expected name: URL template lines, each with {{id}}")
    unknown = set(entities) - set(SYSTEM_OF)
    if unknown:
        raise ConfigError(f"{path}: entities: unknown entity type(s) {sorted(unknown)}; one of {sorted(SYSTEM_OF)}")
    return Links(dict(entities), dict(external))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lines_total(lines: Any) -> int | None:
    """The sum of a record's lines, or None when a line lacks its price or quantity."""
    if not isinstance(lines, list) or not lines:
        return None
    total = 0
    for ln in lines:
        qty, price = _int((ln or {}).get("quantity")), _int((ln or {}).get("unit_price_cents"))
        if qty is None or price is None:
            return None
        total += qty * price
    return total


def record_amount(entity_type: str, rec: dict[str, Any]) -> int | None:
    """What one record is worth as its source system states it (None when it states nothing)."""
    if entity_type == "deal":
        return _int(rec.get("amount_cents"))
    if entity_type == "invoice":
        return _int(rec.get("amount_due_cents"))
    if entity_type == "payment":
        return _int(rec.get("amount_cents"))
    if entity_type == "job":
        return lines_total(rec.get("lines"))
    return None


def amount_at_risk(rec: dict[str, Any], status: dict[str, Any] | None = None) -> int | None:
    """The money an exception holds up: its own amount_at_risk_cents, else the amount of the record it is about.

    None when neither says: shown as "—", never as a made-up 0.
    """
    own = _int(rec.get("amount_at_risk_cents"))
    if own is not None:
        return own
    collection = COLLECTION.get(rec.get("entity_type", ""))
    if status is None or collection is None:
        return None
    entity = (status.get(collection) or {}).get(rec.get("entity_id"))
    return record_amount(rec["entity_type"], entity) if entity else None


def currency_of(rec: dict[str, Any], status: dict[str, Any] | None = None) -> str | None:
    """The currency of an exception's amount: its own, else that of the record it is about."""
    if rec.get("currency"):
        return str(rec["currency"])
    collection = COLLECTION.get(rec.get("entity_type", ""))
    entity = ((status or {}).get(collection or "") or {}).get(rec.get("entity_id")) or {}
    return entity.get("currency")


def money(cents: int | None, currency: str | None = None) -> str:
    """Cents as money ("1,234.50 USD"), or "—" when the amount is not known."""
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    text = f"{sign}{abs(cents) // 100:,}.{abs(cents) % 100:02d}"
    return f"{text} {currency}" if currency else text


def chain(status: dict[str, Any] | None, links: Links) -> list[Step]:
    """Every deal with its jobs, their invoices and those invoices' payments, then whatever is linked to nothing."""
    if not status:
        return []
    deals, jobs = status.get("deals") or {}, status.get("jobs") or {}
    invoices, payments = status.get("invoices") or {}, status.get("payments") or {}
    seen: set[tuple[str, str]] = set()
    out: list[Step] = []

    def add(kind: str, eid: str, rec: dict[str, Any], depth: int, position: str | None = None) -> None:
        seen.add((kind, eid))
        pos = position or rec.get("position") or rec.get("status") or rec.get("stage") or "—"
        if rec.get("deleted"):
            pos = "deleted"
        out.append(Step(kind, eid, str(pos), record_amount(kind, rec), rec.get("currency"), links.of(kind, eid), depth))

    def add_invoice(inv_id: str, depth: int) -> None:
        if ("invoice", inv_id) in seen:
            return
        inv = invoices[inv_id]
        pos = "paid" if invoice_paid(status, inv_id) else inv.get("status")
        add("invoice", inv_id, inv, depth, pos)
        for pay_id, pay in sorted(payments.items()):
            if pay.get("invoice_id") == inv_id:
                add("payment", pay_id, pay, depth + 1)

    for deal_id, deal in sorted(deals.items()):
        add("deal", deal_id, deal, 0)
        for job_id, job in sorted(jobs.items()):
            if job.get("deal_id") == deal_id:
                add("job", job_id, job, 1)
                for inv in invoices_of(status, job_id=job_id):
                    add_invoice(inv["id"], 2)
        for inv in invoices_of(status, deal_id=deal_id):
            add_invoice(inv["id"], 1)
    for job_id, job in sorted(jobs.items()):
        if ("job", job_id) not in seen:
            add("job", job_id, job, 0)
            for inv in invoices_of(status, job_id=job_id):
                add_invoice(inv["id"], 1)
    for inv_id in sorted(invoices):
        add_invoice(inv_id, 0)
    for pay_id, pay in sorted(payments.items()):
        if ("payment", pay_id) not in seen:
            add("payment", pay_id, pay, 0)
    return out
