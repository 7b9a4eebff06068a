"""The Stripe adapter against Stripe's own mock server (stripe-mock), beside the loopback fake of test_adapters.

stripe-mock validates every request against Stripe's OpenAPI specification and answers with Stripe's fixtures;
it keeps no state, so what it proves is the shape of each request (parameters the API version knows, their
types), not idempotency — the loopback fake and the sandbox hold that part of the contract.
`make stripe-mock` builds it from the Go module proxy into the cache; make test does so first.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import stripe
from test_adapters import cmd, command, invoice_cmd

from concord.runtime.broker import die_with_parent
from connectors.outbound.base import APPLIED, DUPLICATE, FatalError
from connectors.outbound.stripe_target import IDEMPOTENCY_WINDOW_MS, StripeTarget

KEY = "sk_test_contract"  # stripe-mock accepts any key of the test form


def _binary() -> Path:
    given = os.environ.get("CONCORD_STRIPE_MOCK")
    if given:
        return Path(given)
    cache = Path(os.environ.get("CONCORD_CACHE_DIR") or Path.home() / ".cache" / "concord")
    built = sorted(cache.glob("stripe-mock-*/stripe-mock"))
    if not built:
        pytest.fail(f"stripe-mock is not built under {cache}: run `make stripe-mock` (make test does)")
    return built[-1]


@pytest.fixture(scope="module")
def stripe_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """stripe-mock on loopback ports the system picks; its HTTP base URL."""
    log = tmp_path_factory.mktemp("stripe-mock") / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(_binary()), "-http-addr", "127.0.0.1:", "-https-addr", "127.0.0.1:"],
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 60  # it compiles the OpenAPI validators first (a few seconds)
        while not (m := re.search(r"Listening for HTTP at address: (127\.0\.0\.1:\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"stripe-mock did not start (exit {proc.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://{m[1]}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def target(stripe_mock: str) -> Iterator[StripeTarget]:
    t = StripeTarget(api_key=KEY, api_base=stripe_mock)
    yield t
    t.close()


def test_create_invoice_sends_only_what_the_api_knows(target: StripeTarget, uid: str) -> None:
    # one line priced by a Price (pricing.price since basil), one by amount: both request shapes validated
    result = target.apply(cmd(invoice_cmd(uid)))
    assert result.outcome == APPLIED and result.ref.startswith("in_")


def test_create_invoice_past_the_idempotency_window_searches_and_lists(target: StripeTarget, uid: str) -> None:
    old = invoice_cmd(uid, issued_at=int(time.time() * 1000) - IDEMPOTENCY_WINDOW_MS - 60_000)
    result = target.apply(cmd(old))  # Invoice.search and InvoiceItem.list, then the lines the invoice lacks
    assert result.outcome in (APPLIED, DUPLICATE) and result.ref.startswith("in_")


def test_void_and_update_customer(target: StripeTarget, uid: str) -> None:
    created = target.apply(cmd(invoice_cmd(uid)))
    void = target.apply(cmd(command("void_invoice", {"invoice_id": created.ref, "job_id": f"job-{uid}",
                                                     "reason": "job cancelled"}, uid, entity="invoice",
                                    entity_id=created.ref)))
    assert void.outcome == APPLIED and void.ref == created.ref
    customer = target.apply(cmd(command("update_customer", {
        "customer_id": f"acct-{uid}", "billing_account_id": "cus_contract", "name": "Harbor Dental",
        "email": "billing@harbor.example", "billing_address": "12 Quay St"}, uid, entity="customer")))
    assert customer.outcome == APPLIED and customer.ref == "cus_contract"


def test_the_mock_rejects_what_the_api_does_not_know(stripe_mock: str, target: StripeTarget, uid: str) -> None:
    # the validation the tests above rely on is real: an InvoiceItem priced the pre-basil way is refused;
    # and Stripe's own 401 is the adapter's fatal error (it stops rather than dead-letter every command)
    assert stripe.api_base == stripe_mock  # the module's base, as the target set it: nothing leaves loopback
    with pytest.raises(stripe.InvalidRequestError, match="additional properties"):
        stripe.InvoiceItem.create(customer="cus_contract", invoice="in_contract", price="price_1", api_key=KEY,
                                  max_network_retries=0)
    wrong = StripeTarget(api_key="not-a-key", api_base=stripe_mock)
    try:
        with pytest.raises(FatalError, match="Stripe answered 401 to create_invoice.*check STRIPE_API_KEY"):
            wrong.apply(cmd(invoice_cmd(uid)))
    finally:
        wrong.close()
