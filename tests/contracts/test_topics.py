"""Topic names per deployment: each app id has its own internal topics, the shared topics keep their names."""

import pytest

from concord.contracts import topics
from concord.exceptions import ConfigError

PROD, DEMO = topics.Deployment("concord"), topics.Deployment("concord-demo")


def internal_names(names):
    return {t.name for t in names.specs}


def test_two_deployments_never_share_an_internal_topic():
    assert internal_names(PROD) and not internal_names(PROD) & internal_names(DEMO)
    assert not set(PROD.worker_inputs) - {t.name for t in topics.ALL} & set(DEMO.worker_inputs)
    assert not set(PROD.exception_queues) & set(DEMO.exception_queues)
    # an app id that is another's prefix still gets names of its own
    assert not internal_names(topics.Deployment("a")) & internal_names(topics.Deployment("a-b"))


def test_internal_topics_are_the_app_id_then_the_base_name():
    assert PROD.accepted == "concord-accepted.changes"
    assert PROD.guard_controls == "concord-guard.controls"
    assert PROD.exception_actions == "concord-actions.exceptions"
    assert PROD.exceptions("finance") == "concord-exceptions.finance"
    assert PROD.exception_queues == tuple(f"concord-exceptions.{o}" for o in topics.OWNERS)
    assert internal_names(PROD) == {
        *(f"concord-{b}" for b in ("accepted.changes", "guard.controls", "actions.exceptions")),
        *PROD.exception_queues,
        *(f"deadletter.concord-{b}" for b in ("accepted.changes", "guard.controls", "actions.exceptions")),
        *(f"deadletter.{q}" for q in PROD.exception_queues)}
    assert PROD.base("concord-exceptions.finance") == "exceptions.finance"
    assert PROD.base("concord-demo-exceptions.finance") is None and PROD.base("changes.crm.deal") is None


def test_shared_topics_are_not_prefixed():
    shared = {t.name for t in topics.ALL}
    assert {"changes.crm.deal", "commands.billing", "outcomes.commands", "audit.decisions",
            "deadletter.changes.crm.deal"} <= shared
    assert not any(n.startswith(("concord-", "accepted.", "guard.", "actions.", "exceptions."))
                   for n in shared), "no internal topic is shared"
    assert [t for t in PROD.topics if t.name in shared] == list(topics.ALL)
    assert {t.name for t in PROD.topics} == shared | internal_names(PROD)
    assert shared <= set(PROD.worker_inputs) | shared and "changes.crm.deal" in DEMO.worker_inputs
    assert topics.COMMAND_OUTCOMES.name in PROD.worker_inputs and topics.COMMAND_OUTCOMES.name in DEMO.worker_inputs


@pytest.mark.parametrize("app_id", ["", "has space", "slash/ed", "é", "x" * 151, "a:b", "deadletter.concord"])
def test_a_bad_app_id_is_refused(app_id):
    with pytest.raises(ConfigError, match="app id"):
        topics.Deployment(app_id)


def test_no_deployments_topic_is_another_deployments_dead_letter():
    dead = {t.name for t in PROD.specs if t.value_schema == "dead_letter"}
    assert topics.spec(topics.deadletter_topic(PROD.exceptions("finance"))).value_schema == "dead_letter"
    assert len(dead) == len(topics.INTERNAL) and all(topics.internal_base(n) is None for n in dead)


def test_spec_resolves_any_deployments_internal_topics_and_their_dead_letters():
    other = topics.Deployment("tenant_2.staging")
    queue = topics.spec(other.exceptions("revenue-ops"))
    assert (queue.name, queue.value_schema) == ("tenant_2.staging-exceptions.revenue-ops", "exception")
    dead = topics.spec(topics.deadletter_topic(other.exceptions("revenue-ops")))
    assert (dead.name, dead.value_schema) == ("deadletter.tenant_2.staging-exceptions.revenue-ops", "dead_letter")
    assert topics.spec(other.accepted).value_schema == "change_event"
    assert topics.spec(other.guard_controls).value_schema == "control"
    assert topics.spec(other.exception_actions).value_schema == "action"
    assert topics.spec("changes.crm.deal") is topics.BY_NAME["changes.crm.deal"]
    for undeclared in ("exceptions.finance", "accepted.changes", "concord-exceptions.nobody",
                       "concord-changes.crm.deal", "deadletter.exceptions.finance", "bad id-exceptions.finance"):
        with pytest.raises(KeyError, match="not declared"):
            topics.spec(undeclared)


def test_exception_queues_are_told_from_other_topics_of_any_deployment():
    assert all(topics.is_exception_queue(q) for q in (*PROD.exception_queues, *DEMO.exception_queues))
    assert not any(topics.is_exception_queue(n) for n in (
        "exceptions.finance", PROD.accepted, "deadletter.concord-exceptions.finance", "audit.decisions"))
    assert topics.internal_base(DEMO.exceptions("finance")) == "exceptions.finance"
