"""The ``sandbox`` target: applies commands to a real database (SQLite by default, PostgreSQL with a DSN).

Each command is applied in one transaction with the insert of its ``effects`` row, whose primary key
is the ``command_id``: a redelivered command finds its row and changes nothing, so there is exactly
one effect per command however often it arrives. PostgreSQL goes through ``psycopg`` (``psycopg[binary]``,
a dependency of Concord); its tests run against a throwaway cluster (tests/test_adapters_postgres.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from concord.contracts import events as ev
from connectors.outbound.base import (
    APPLIED,
    DUPLICATE,
    REQUIRED,
    Command,
    FatalError,
    PermanentError,
    Result,
    TransientError,
    check,
)

TYPES = frozenset(REQUIRED)  # every command type Concord issues

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS effects (
        command_id TEXT PRIMARY KEY, type TEXT NOT NULL, target_system TEXT NOT NULL, entity_type TEXT NOT NULL,
        entity_id TEXT NOT NULL, ref TEXT NOT NULL, trace_id TEXT NOT NULL, applied_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS invoices (
        invoice_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, billing_account_id TEXT, billing_terms TEXT,
        deal_id TEXT, job_id TEXT, amount_cents BIGINT NOT NULL, lines TEXT NOT NULL, status TEXT NOT NULL,
        void_reason TEXT, command_id TEXT NOT NULL, updated_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY, deal_id TEXT NOT NULL, customer_id TEXT NOT NULL, lines TEXT NOT NULL,
        address TEXT, account_ref TEXT, command_id TEXT NOT NULL, updated_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS deal_billing_statuses (
        deal_id TEXT PRIMARY KEY, billing_status TEXT NOT NULL, invoice_id TEXT, command_id TEXT NOT NULL,
        updated_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS customers (
        customer_id TEXT PRIMARY KEY, name TEXT, email TEXT, billing_address TEXT, billing_terms TEXT,
        billing_account_id TEXT, external_ids TEXT NOT NULL, command_id TEXT NOT NULL, updated_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS billing_holds (
        exception_id TEXT PRIMARY KEY, entity_type TEXT NOT NULL, entity_id TEXT NOT NULL, reason_code TEXT,
        held INTEGER NOT NULL, command_id TEXT NOT NULL, updated_at BIGINT NOT NULL)""",
)


class SandboxTarget:
    """Commands applied to local tables, one ``effects`` row per command id."""

    name = "sandbox"
    types = TYPES

    def __init__(self, db: str | Path = ".concord/sandbox.db", dsn: str | None = None,
                 echo: Callable[[dict[str, Any]], None] | None = None,
                 echo_systems: Collection[str] = ("billing", "crm", "dispatch")) -> None:
        self.echo = echo  # given: the sandbox plays the target systems and reports what it applied as their feed
        self.echo_systems = frozenset(echo_systems)
        self._echo_seq = 0
        if dsn:
            try:
                import psycopg
            except ImportError:
                raise FatalError("a PostgreSQL DSN was given but psycopg is not installed "
                                 "(pip install 'psycopg[binary]'), so the sandbox can only use SQLite") from None
            self._psycopg, self._dsn = psycopg, dsn
            try:
                self.conn: Any = psycopg.connect(dsn, connect_timeout=10)
            except psycopg.Error as exc:
                raise FatalError(f"cannot connect to the sandbox PostgreSQL database: {exc}") from None
            self._pg = True
            self.where = "postgresql"
        else:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(db), isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self._pg = False
            self.where = str(db)
        self._begin()
        if self._pg:  # several adapters starting at once: CREATE TABLE IF NOT EXISTS is not race-free there
            self._x("SELECT pg_advisory_xact_lock(4247)")
        for ddl in SCHEMA:
            self._x(ddl)
        self.conn.commit() if self._pg else self._x("COMMIT")

    # -- plumbing: one SQL dialect ("?" placeholders, ON CONFLICT) for both engines
    def _x(self, sql: str, params: tuple = ()) -> Any:
        if self._pg:
            sql = sql.replace("?", "%s")
        return self.conn.execute(sql, params)

    def _begin(self) -> None:
        if not self._pg:
            self._x("BEGIN IMMEDIATE")

    def apply(self, cmd: Command) -> Result:
        """Insert the effect and apply the command in one transaction; a known command id is a duplicate."""
        check(cmd, self.types, self.name)
        if self._pg and self.conn.closed:  # the server went away last time (a TransientError): connect again
            try:
                self.conn = self._psycopg.connect(self._dsn, connect_timeout=10)
            except self._psycopg.OperationalError as exc:
                raise TransientError(f"database: {exc}") from exc
        now = int(time.time() * 1000)
        self._begin()
        try:
            cur = self._x("INSERT INTO effects (command_id, type, target_system, entity_type, entity_id, ref, "
                          "trace_id, applied_at) VALUES (?, ?, ?, ?, ?, '', ?, ?) ON CONFLICT (command_id) DO NOTHING",
                          (cmd.command_id, cmd.type, cmd.target_system, cmd.entity_type, cmd.entity_id, cmd.trace_id,
                           now))
            if cur.rowcount == 0:
                ref = self._x("SELECT ref FROM effects WHERE command_id = ?", (cmd.command_id,)).fetchone()[0]
                self._rollback()
                return Result(DUPLICATE, ref)
            ref = getattr(self, f"_{cmd.type}")(cmd, now)
            self._x("UPDATE effects SET ref = ? WHERE command_id = ?", (ref, cmd.command_id))
            self._commit()
            if self.echo is not None and cmd.target_system in self.echo_systems:
                # microseconds, and never twice the same: two updates of one deal within a millisecond stay ordered
                self._echo_seq = max(self._echo_seq + 1, time.time_ns() // 1000)
                change = echo_event(cmd, ref, now, self._echo_seq)
                if change is not None:
                    self.echo(change)
            return Result(APPLIED, ref)
        except BaseException as exc:
            self._rollback()
            kinds = {k.__name__ for k in type(exc).__mro__}  # psycopg raises subclasses (UniqueViolation, …)
            if "IntegrityError" in kinds:  # sqlite3 and psycopg name the base the same
                raise PermanentError(f"{cmd.type} conflicts with a row already there: {exc}") from exc
            if "OperationalError" in kinds:  # locked database, lost connection, deadlock, serialization failure
                raise TransientError(f"database: {exc}") from exc
            raise

    def _commit(self) -> None:
        self.conn.commit() if self._pg else self._x("COMMIT")

    def _rollback(self) -> None:
        if self._pg:
            if not self.conn.closed:
                self.conn.rollback()
        elif self.conn.in_transaction:
            self._x("ROLLBACK")

    # -- one method per command type; each returns the id of the row it touched
    def _create_invoice(self, cmd: Command, now: int) -> str:
        p = cmd.payload
        invoice_id = p.get("invoice_id") or f"inv_{cmd.command_id[:24]}"
        self._x("INSERT INTO invoices (invoice_id, customer_id, billing_account_id, billing_terms, deal_id, job_id, "
                "amount_cents, lines, status, command_id, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?)",
                (invoice_id, p["customer_id"], p.get("billing_account_id"), p.get("billing_terms"), p.get("deal_id"),
                 p.get("job_id"), int(p["amount_cents"]), json.dumps(p["lines"], sort_keys=True), cmd.command_id,
                 now))
        return invoice_id

    def _void_invoice(self, cmd: Command, now: int) -> str:
        p = cmd.payload
        row = self._x("SELECT status FROM invoices WHERE invoice_id = ?", (p["invoice_id"],)).fetchone()
        if row is None:
            raise PermanentError(f"no invoice {p['invoice_id']} to void")
        if row[0] == "paid":
            raise PermanentError(f"invoice {p['invoice_id']} is paid and cannot be voided")
        self._x("UPDATE invoices SET status = 'void', void_reason = ?, command_id = ?, updated_at = ? "
                "WHERE invoice_id = ?", (p.get("reason"), cmd.command_id, now, p["invoice_id"]))
        return str(p["invoice_id"])

    def _create_job(self, cmd: Command, now: int) -> str:
        p = cmd.payload
        job_id = p.get("job_id") or f"job_{cmd.command_id[:24]}"
        self._x("INSERT INTO jobs (job_id, deal_id, customer_id, lines, address, account_ref, command_id, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, p["deal_id"], p["customer_id"], json.dumps(p.get("lines") or [], sort_keys=True),
                 _text(p.get("address")), _text(p.get("account_ref")), cmd.command_id, now))
        return job_id

    def _update_deal_billing_status(self, cmd: Command, now: int) -> str:
        p = cmd.payload
        self._x("INSERT INTO deal_billing_statuses (deal_id, billing_status, invoice_id, command_id, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deal_id) DO UPDATE SET billing_status = excluded.billing_status, "
                "invoice_id = excluded.invoice_id, command_id = excluded.command_id, updated_at = excluded.updated_at",
                (p["deal_id"], p["billing_status"], p.get("invoice_id"), cmd.command_id, now))
        return str(p["deal_id"])

    def _update_customer(self, cmd: Command, now: int) -> str:
        p = cmd.payload
        self._x("INSERT INTO customers (customer_id, name, email, billing_address, billing_terms, billing_account_id, "
                "external_ids, command_id, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) "
                "DO UPDATE SET name = excluded.name, email = excluded.email, "
                "billing_address = excluded.billing_address, billing_terms = excluded.billing_terms, "
                "billing_account_id = excluded.billing_account_id, external_ids = excluded.external_ids, "
                "command_id = excluded.command_id, updated_at = excluded.updated_at",
                (p["customer_id"], p.get("name"), p.get("email"), _text(p.get("billing_address")),
                 p.get("billing_terms"), p.get("billing_account_id"), json.dumps(p.get("external_ids") or {},
                                                                                 sort_keys=True), cmd.command_id, now))
        return str(p["customer_id"])

    def _hold_billing(self, cmd: Command, now: int) -> str:
        return self._set_hold(cmd, now, held=True)

    def _release_billing_hold(self, cmd: Command, now: int) -> str:
        return self._set_hold(cmd, now, held=False)

    def _set_hold(self, cmd: Command, now: int, held: bool) -> str:
        p = cmd.payload
        self._x("INSERT INTO billing_holds (exception_id, entity_type, entity_id, reason_code, held, command_id, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (exception_id) DO UPDATE SET "
                "held = excluded.held, command_id = excluded.command_id, updated_at = excluded.updated_at",
                (p["exception_id"], cmd.entity_type, cmd.entity_id, p.get("reason_code"), int(held), cmd.command_id,
                 now))
        return str(p["exception_id"])

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()


def applied_effects(db: Path) -> list[str]:
    """The command ids a sandbox database applied, one per effect (a command applied twice shows twice)."""
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT command_id FROM effects")]


def echo_event(cmd: Command, ref: str, now: int, seq: int) -> dict[str, Any] | None:
    """The owning system's own change event for a command the sandbox applied, carrying the command id.

    Partial updates name the one field they change in ``changed_fields``; the other payload fields are the
    schema's required fields, not news (Concord keeps what it knew of them). ``seq`` is a record version that
    only grows (the apply time in microseconds), as such sources send them: not contiguous.
    """
    p = cmd.payload
    common = {"at": now, "op": "update", "vendor": "sandbox", "event_id": f"sandbox:{cmd.command_id}",
              "contiguous": False, "trace_id": cmd.trace_id or None, "caused_by_command_id": cmd.command_id}
    if cmd.type == "update_deal_billing_status":
        return ev.change_event("deal", p["deal_id"], seq, ev.deal("closed_won", [], billing_status=p["billing_status"]),
                               cmd.customer_id, changed=["billing_status"], **common)
    if cmd.type == "create_invoice":
        lines = [ev.line(ln["sku"], ln["quantity"], ln["unit_price_cents"], ln.get("description") or "")
                 for ln in p["lines"]]
        return ev.change_event("invoice", ref, seq, ev.invoice("open", lines, deal_id=p.get("deal_id"),
                                                               job_id=p.get("job_id"), issued_at=now,
                                                               amount_due_cents=int(p["amount_cents"])),
                               cmd.customer_id, **{**common, "op": "create"})
    if cmd.type == "create_job":
        lines = [ev.line(ln["sku"], ln["quantity"], ln["unit_price_cents"], ln.get("description") or "")
                 for ln in p.get("lines") or []]
        return ev.change_event("job", ref, seq, ev.job("scheduled", lines, deal_id=p["deal_id"]), cmd.customer_id,
                               **{**common, "op": "create"})
    if cmd.type == "void_invoice":
        return ev.change_event("invoice", ref, seq, ev.invoice("void", []), cmd.customer_id, changed=["status"],
                               **common)
    return None  # billing and dispatch send no customer records; a hold has no record of its own


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)
