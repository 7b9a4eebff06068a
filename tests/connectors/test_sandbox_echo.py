"""The sandbox as the target systems: what it applies comes back as the owning system's own change event."""

import json

from concord.contracts import events as ev
from concord.contracts.validate import validate_change
from concord.domain.rules import command_id
from connectors.outbound.base import Command
from connectors.outbound.sandbox import SandboxTarget


def cmd(ctype, target, entity_type, entity_id, payload):
    return Command(command_id(ctype, target, entity_type, entity_id), ctype, target, entity_type, entity_id, "c1",
                   payload, "trace:x", 1_000)


def test_applied_commands_echo_as_their_systems_change_events_and_duplicates_do_not(tmp_path):
    echoed = []
    target = SandboxTarget(tmp_path / "s.db", echo=echoed.append)
    lines = [{"sku": "SVC-INSTALL", "price_id": "p", "quantity": 1, "unit_price_cents": 25_000, "description": "x"}]
    try:
        invoice = cmd("create_invoice", "billing", "deal", "d1",
                      {"customer_id": "c1", "deal_id": "d1", "lines": lines, "amount_cents": 25_000})
        status = cmd("update_deal_billing_status", "crm", "deal", "d1", {"deal_id": "d1", "billing_status": "paid"})
        assert target.apply(invoice).outcome == "applied" and target.apply(status).outcome == "applied"
        assert target.apply(status).outcome == "duplicate"
        assert [e["caused_by_command_id"] for e in echoed] == [invoice.command_id, status.command_id]
        inv, deal = echoed
        assert (inv["source_system"], inv["entity_type"], inv["op"]) == ("billing", "invoice", "create")
        assert inv["payload"]["amount_due_cents"] == 25_000 and inv["payload"]["deal_id"] == "d1"
        assert (deal["source_system"], deal["entity_id"], deal["changed_fields"]) == ("crm", "d1", ["billing_status"])
        assert deal["payload"]["billing_status"] == "paid" and deal["seq"] > inv["seq"]
        assert not deal["seq_contiguous"]
        for e in echoed:  # each is a valid change event on its topic
            validate_change(e, f"changes.{e['source_system']}.{e['entity_type']}")
        json.dumps(echoed)
    finally:
        target.close()


def test_echo_only_for_the_systems_it_plays(tmp_path):
    echoed = []
    target = SandboxTarget(tmp_path / "s.db", echo=echoed.append, echo_systems=("crm",))
    try:
        job = cmd("create_job", "dispatch", "deal", "d1", {"deal_id": "d1", "customer_id": "c1",
                                                           "lines": [ev.line("SVC-INSTALL")]})
        assert target.apply(job).outcome == "applied"
        assert echoed == []
    finally:
        target.close()
