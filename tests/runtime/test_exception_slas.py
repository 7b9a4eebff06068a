"""The SLAs MTTR is held against: every routed (owner, reason), exported once per worker from routing.yaml."""

from concord.domain.routing import load_routing, parse_duration
from concord.runtime import metrics
from concord.runtime.metrics import REGISTRY


def sla(owner, reason):
    return REGISTRY.get_sample_value("concord_exception_sla_seconds", {"owner": owner, "reason": reason})


def test_each_routed_reason_exports_its_owners_sla_and_sequence_gaps_each_data_owners(monkeypatch):
    monkeypatch.delenv("CONCORD_SLA_SCALE", raising=False)
    routing = load_routing()
    metrics.publish_slas(routing)
    assert sla("revenue-ops", "customer_drift") == parse_duration("1d") == 86_400
    assert sla("finance", "unbilled_work") == parse_duration(routing.reasons["unbilled_work"].sla)
    gap = parse_duration(routing.reasons["sequence_gap"].sla)
    assert {o: sla(o, "sequence_gap") for o in routing.gap_owner_by_system.values()} == {
        o: gap for o in routing.gap_owner_by_system.values()}
    assert sla("marketing-ops", "unbilled_work") is None, "only the routed owner of a reason has its SLA"


def test_the_exported_sla_is_the_scaled_one_exceptions_get(monkeypatch):
    monkeypatch.setenv("CONCORD_SLA_SCALE", "0.001")
    metrics.publish_slas(load_routing())
    assert sla("revenue-ops", "customer_drift") == 86.4
