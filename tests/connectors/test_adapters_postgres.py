"""The sandbox target on a real PostgreSQL server: the adapters' contract, concurrent redelivery, lost connections.

A throwaway cluster (Debian's ``postgresql``; ``make system-packages`` installs it) is initialised in a temp
dir and started on a free loopback port with its unix socket in that dir; initdb refuses root, so as root it
runs as the ``postgres`` user (else ``nobody``). Each test gets a fresh database. No server binaries is a
failure, not a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from test_adapters import (  # the same contract every target passes, run here against PostgreSQL
    Backend,
    command,
    invoice_cmd,
    test_contract_invalid_commands_are_permanent_and_send_nothing,
    test_contract_one_effect_per_command_id,
    test_contract_the_system_refusing_is_permanent_with_its_words,
    test_contract_void_after_create,
)

from connectors.outbound.base import APPLIED, DUPLICATE, Command, FatalError, PermanentError, TransientError
from connectors.outbound.sandbox import SandboxTarget

__all__ = ["test_contract_invalid_commands_are_permanent_and_send_nothing", "test_contract_one_effect_per_command_id",
           "test_contract_the_system_refusing_is_permanent_with_its_words", "test_contract_void_after_create"]


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if not found:
        pytest.fail(f"PostgreSQL server binaries not found ({name} neither on PATH nor in /usr/lib/postgresql/*/bin): "
                    "run `make system-packages` (installs Debian's postgresql)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A running throwaway cluster; yields a DSN to its ``postgres`` database (user ``concord``, trust auth)."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    root = tempfile.mkdtemp(prefix="concord-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.fail("running as root and neither a postgres nor a nobody user exists to run initdb as")
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd: str, timeout: float = 60) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout, cwd=root)
        if done.returncode:
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}\n{tail}",
                        pytrace=False)

    run(initdb, "-D", data, "-U", "concord", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
    run(pg_ctl, "-D", data, "-l", log, "-w", "-t", "30", "start", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=50")
    try:
        yield f"host=127.0.0.1 port={port} user=concord dbname=postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def dsn(cluster: str) -> str:
    """A fresh database on the cluster for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return cluster.replace("dbname=postgres", f"dbname={name}")


def count(dsn: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(dsn) as c:
        return c.execute(sql, params).fetchone()


@pytest.fixture
def backend(dsn: str) -> Iterator[Backend]:
    """The contract's backend: the sandbox target on this test's PostgreSQL database."""
    t = SandboxTarget(dsn=dsn)
    assert t.where == "postgresql"
    yield Backend(t, lambda cid: count(dsn, "SELECT count(*) FROM invoices WHERE command_id = %s", cid)[0])
    t.close()


def every_type(uid: str) -> list[Command]:
    return [Command.from_record(r) for r in (
        invoice_cmd(uid),
        command("create_job", {"deal_id": f"deal-{uid}", "customer_id": f"acct-{uid}", "lines": [],
                               "address": "1 Main St", "account_ref": "D-1"}, uid, "dispatch", "deal"),
        command("update_deal_billing_status", {"deal_id": f"deal-{uid}", "billing_status": "invoiced",
                                               "invoice_id": "inv-1"}, uid, "crm", "deal"),
        command("update_customer", {"customer_id": f"acct-{uid}", "name": "Acme", "email": "a@acme.test",
                                    "billing_address": "1 Main St", "billing_terms": "net_30",
                                    "billing_account_id": "cus_1", "external_ids": {"stripe": "cus_1"}},
                uid, "dispatch", "customer"))]


def test_postgres_concurrent_redelivery_has_one_effect_per_command(dsn: str, uid: str) -> None:
    """Eight connections deliver the same 4 × 10 commands at once: exactly one effect each."""
    cmds = [c for i in range(10) for c in every_type(f"{uid}{i}")]
    outcomes: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def deliver(offset: int) -> None:  # each consumer in its own order, so they collide on different rows
        t = SandboxTarget(dsn=dsn)  # the schema is created by all eight at once too
        try:
            start.wait()
            mine = cmds[offset:] + cmds[:offset]
            outcomes.extend(t.apply(c).outcome for c in mine)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            t.close()

    threads = [threading.Thread(target=deliver, args=(i * 5,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(outcomes) == sorted([APPLIED] * 40 + [DUPLICATE] * 280)
    assert count(dsn, "SELECT count(*) FROM effects") == (40,)
    assert [count(dsn, f"SELECT count(*) FROM {t}")[0]
            for t in ("invoices", "jobs", "deal_billing_statuses", "customers")] == [10, 10, 10, 10]
    assert count(dsn, "SELECT sum(amount_cents), min(status) FROM invoices") == (59900, "open")
    assert count(dsn, "SELECT count(*) FROM effects WHERE ref = ''") == (0,)


def test_postgres_conflicts_are_permanent_and_roll_back(dsn: str, uid: str) -> None:
    t = SandboxTarget(dsn=dsn)
    try:
        first = invoice_cmd(uid)
        first["payload"] = first["payload"].replace('"job_id"', '"invoice_id": "in_fixed", "job_id"')
        assert t.apply(Command.from_record(first)).ref == "in_fixed"
        other = invoice_cmd(uid + "b")
        other["payload"] = first["payload"]  # another command creating the same invoice id
        with pytest.raises(PermanentError, match="(?s)conflicts with a row already there.*in_fixed"):
            t.apply(Command.from_record(other))
        assert count(dsn, "SELECT count(*) FROM effects WHERE command_id = %s", other["command_id"]) == (0,)
        assert t.apply(Command.from_record(first)).outcome == DUPLICATE  # the connection is usable after it
    finally:
        t.close()


def test_postgres_lost_connection_is_transient_then_reconnects(dsn: str, cluster: str, uid: str) -> None:
    t = SandboxTarget(dsn=dsn)
    try:
        pid = t.conn.info.backend_pid
        with psycopg.connect(cluster, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        c = Command.from_record(invoice_cmd(uid))
        with pytest.raises(TransientError, match="database"):
            t.apply(c)
        assert t.apply(c).outcome == APPLIED and t.apply(c).outcome == DUPLICATE
        assert count(dsn, "SELECT count(*) FROM effects") == (1,)
    finally:
        t.close()


def test_postgres_unreachable_is_fatal_at_start(cluster: str) -> None:
    with pytest.raises(FatalError, match="cannot connect to the sandbox PostgreSQL"):
        SandboxTarget(dsn=cluster.replace("dbname=postgres", "dbname=no_such_db"))
