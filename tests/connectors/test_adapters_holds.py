"""Billing holds: the commands an overdue exception sends reach the sandbox, once each, and undo cleanly."""

import sqlite3

import pytest

from concord.runtime.harness import InProcess
from connectors.outbound.base import APPLIED, DUPLICATE, Command, PermanentError
from connectors.outbound.sandbox import SandboxTarget
from connectors.outbound.stripe_target import StripeTarget

EXC = {"exception_id": "x1", "reason_code": "missing_billing_account", "customer_id": "c1", "entity_type": "deal",
       "entity_id": "d1", "trace_id": "t1"}


def hold_command(hold: bool) -> Command:
    pipeline = InProcess().pipeline
    out = pipeline.billing_hold(EXC, 1_000, hold=hold)
    return Command.from_record(pipeline.codec.decode(out.value)[1])


def test_sandbox_holds_and_releases_billing_once_per_command(tmp_path):
    db = tmp_path / "sandbox.db"
    target = SandboxTarget(db)
    hold, release = hold_command(True), hold_command(False)
    assert hold.type == "hold_billing" and release.type == "release_billing_hold"
    assert hold.command_id != release.command_id
    assert target.apply(hold).outcome == APPLIED
    assert target.apply(hold).outcome == DUPLICATE
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT entity_type, entity_id, held FROM billing_holds").fetchall() == [("deal", "d1", 1)]
    assert target.apply(release).outcome == APPLIED
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT held FROM billing_holds WHERE exception_id = 'x1'").fetchone() == (1 - 1,)
    target.close()


def test_stripe_has_no_hold_and_says_so():
    with pytest.raises(PermanentError, match="hold_billing"):
        StripeTarget(api_key="sk_test_unused").apply(hold_command(True))


def test_adapters_apply_nothing_for_the_canary(tmp_path):
    from connectors.outbound.consumer import Adapter, Origin

    pipeline = InProcess().pipeline
    out = pipeline.billing_hold({**EXC, "customer_id": "canary:concord"}, 1_000, hold=True)
    db = tmp_path / "sandbox.db"
    adapter = Adapter("127.0.0.1:1", SandboxTarget(db), ["billing"], pipeline.names)
    assert adapter.handle(Origin("commands.billing", 0, 0, out.key, out.value)) == "canary"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM effects").fetchone() == (0,)
