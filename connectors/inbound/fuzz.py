"""``make fuzz``: mutated vendor payloads through normalization, and signed hostile bodies at the receiver.

Every connector gets its seed records (tests/fixtures/connectors) mutated: keys deleted, values nulled or
of the wrong type, huge and deeply nested values, lone surrogates, enormous numbers, truncation and
invalid UTF-8. The promise checked for each input: normalization returns events and dead letters (never
raises), within a time bound; every event encodes with the change_event schema; every dead letter
encodes and fits the broker's message limit. Then signed bodies go to a live receiver on an embedded
broker: none may be answered 5xx. The last line is ``fuzz: inputs=N bugs=N timeouts=N server_5xx=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concord.contracts.codec import Codec
from connectors.inbound import common as c
from connectors.inbound import hubspot, ingest, jobber

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "connectors"
SEEDS = {
    "salesforce": ["salesforce_account_create.json", "salesforce_opportunity_update.json", "salesforce_gap.json"],
    "hubspot": ["hubspot_batch.json"],
    "stripe": ["stripe_invoice_paid.json", "stripe_payment_failed.json", "stripe_customer_updated.json"],
    "debezium": ["debezium_jobs.jsonl", "debezium_outbox.jsonl"],
    "jobber": ["jobber_job_complete.json", "jobber_job_update_ids_only.json"],
    "canonical": ["canonical.jsonl"],
    "csv": ["spreadsheet.csv"],
}
BROKER_MESSAGE_LIMIT = 1_000_000  # librdkafka's default message.max.bytes, below the broker's 1048588
TIME_BOUND_S = 10.0  # one normalization may take this long on a loaded machine; a hang takes far longer
SECRETS = {"STRIPE_WEBHOOK_SECRET": "whsec_fuzz", "HUBSPOT_CLIENT_SECRET": "hs-fuzz",
           "JOBBER_WEBHOOK_SECRET": "jb-fuzz", "SALESFORCE_WEBHOOK_TOKEN": "sf-fuzz"}

# Values a hostile or careless sender puts where a field's value belongs.
HOSTILE_TEXT = ["", " ", "\ud800", "a\udfffb", "\x00", "NaN", "Infinity", "-1", "1.5e1000000", "1e999999",
                "9" * 400, "9223372036854775808", "0.000000001", "yesterday", "2026-13-45T25:61:00Z",
                "concord:cmd_x", "*", "closed won", "\u202e\u0000\ufeff", "x" * 1000]
HOSTILE_NUMBERS = ["1e999999", "-1e999999", "1" + "0" * 400, "2e308", "NaN", "Infinity", "-Infinity",
                   "9223372036854775808", "-9223372036854775809", "0.5", "-0", "1E+30", "123456789012345678901234"]


def seeds(source: str, root: Path = FIXTURES) -> list[bytes]:
    """The seed inputs of ``source``: each fixture file, and each line of a JSON-lines fixture."""
    out: list[bytes] = []
    for name in SEEDS[source]:
        data = (root / name).read_bytes()
        out += [ln for ln in data.splitlines() if ln.strip()] if name.endswith(".jsonl") else [data]
    return out


def _paths(doc: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        node, prefix = stack.pop()
        out.append(prefix)
        if isinstance(node, dict):
            stack.extend((v, (*prefix, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*prefix, i)) for i, v in enumerate(node))
    return out


def _hostile_value(rng: random.Random) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(HOSTILE_TEXT)
    if kind == 2:
        return rng.choice([True, False, 0, -1, 2**63, -(2**63) - 1, 10**30, 1.5, -0.0, 1e300])
    if kind == 3:
        return [rng.choice(HOSTILE_TEXT)] * rng.randrange(4)
    if kind == 4:
        return {rng.choice(HOSTILE_TEXT): rng.choice(HOSTILE_TEXT)}
    if kind == 5:
        return "x" * rng.choice([70_000, 300_000])
    if kind == 6:
        return f"\x00deep{rng.choice([65, 200, 3000])}"  # spliced in as text after serializing (see _deepen)
    if kind == 7:
        return [0] * rng.choice([10, 10_001])
    if kind == 8:
        return rng.randrange(-(10**20), 10**20)
    return rng.choice(HOSTILE_TEXT)


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    elif delete and isinstance(node, list):
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    return doc


def _deepen(text: str) -> str:
    """Each deep-nesting marker replaced by that many nested arrays (too deep for the serializer to write)."""
    for n in (65, 200, 3000):
        text = text.replace(f'"\\u0000deep{n}"', "[" * n + '"deep"' + "]" * n)
    return text


def mutate_json(seed: bytes, rng: random.Random) -> bytes:
    """One mutation of a JSON seed: a tree edit (delete, null, wrong type, huge, deep) or a byte edit."""
    doc = json.loads(seed)
    kind = rng.randrange(10)
    if kind <= 5:
        paths = _paths(doc)  # of the seed: an edit may remove a path another then skips
        for _ in range(1 + rng.randrange(3)):
            path = rng.choice(paths)
            try:
                doc = _set(doc, path, _hostile_value(rng), delete=kind <= 1 and bool(path))
            except (KeyError, IndexError, TypeError):
                continue
        out = _deepen(json.dumps(doc, ensure_ascii=rng.random() < 0.5, allow_nan=True))
        return out.encode("utf-8", "surrogatepass")  # a lone surrogate written raw is invalid UTF-8, on purpose
    data = json.dumps(doc).encode()
    if kind == 6:
        return data[:rng.randrange(len(data) + 1)]  # truncated
    if kind == 7:
        i = rng.randrange(len(data) + 1)
        return data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]) + data[i:]
    if kind == 8:  # a number token replaced by an enormous or non-finite one
        digits = [i for i, b in enumerate(data) if 48 <= b <= 57 and data[i - 1:i] in (b":", b" ", b"[")]
        if digits:
            i = rng.choice(digits)
            j = i
            while j < len(data) and data[j:j + 1] in b"0123456789.eE+-":
                j += 1
            return data[:i] + rng.choice(HOSTILE_NUMBERS).encode() + data[j:]
        return data
    return b"[" * rng.choice([100, 5000, 200_000]) + b"]" * rng.randrange(3)


def mutate_csv(seed: bytes, rng: random.Random) -> bytes:
    """One mutation of a CSV seed: bad cells, CR-only lines, huge cells, quotes, invalid UTF-8, truncation."""
    lines = seed.decode().splitlines()
    kind = rng.randrange(7)
    if kind == 0:
        return "\r".join(lines).encode()
    if kind == 1:
        return seed[:rng.randrange(len(seed) + 1)]
    if kind == 2:
        i = rng.randrange(len(seed) + 1)
        return seed[:i] + rng.choice([b"\xff", b"\xc3", b"\x00", b'"', b"\r"]) + seed[i:]
    row = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
    cells = lines[row].split(",")
    col = rng.randrange(len(cells))
    if kind == 3:
        cells[col] = "x" * rng.choice([140_000, 300_000])
    elif kind == 4:
        cells[col] = rng.choice(HOSTILE_NUMBERS)
    else:
        cells[col] = rng.choice(HOSTILE_TEXT).replace(",", "")
    lines[row] = ",".join(cells)
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def mutate(source: str, seed: bytes, rng: random.Random) -> bytes:
    """One hostile input for ``source`` derived from ``seed``."""
    return mutate_csv(seed, rng) if source == "csv" else mutate_json(seed, rng)


@dataclass
class Finding:
    """A broken promise: what input, what went wrong."""

    source: str
    kind: str  # bug | timeout | server_5xx
    detail: str
    data: bytes


@dataclass
class Tally:
    """What a campaign found."""

    inputs: int = 0
    bodies: int = 0
    unexpected: int = 0  # errors a mapper did not raise on purpose, caught and dead-lettered with a generic reason
    findings: list[Finding] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def line(self) -> str:
        return (f"fuzz: inputs={self.inputs + self.bodies} bugs={self.count('bug')} "
                f"timeouts={self.count('timeout')} server_5xx={self.count('server_5xx')}")


def broken_promises(batch: ingest.Batch, codec: Codec) -> list[str]:
    """What in a normalized batch would fail at the broker: an event or a dead letter that does not encode or fit."""
    problems = []
    for m in batch.events:
        try:
            size = len(codec.encode("change_event", m.event, m.topic))
        except Exception as exc:
            problems.append(f"event does not encode: {type(exc).__name__}: {exc}")
            continue
        if size > BROKER_MESSAGE_LIMIT:
            problems.append(f"event is {size} bytes, over the broker's limit")
    for d in batch.deadletters:
        try:
            size = len(codec.encode("dead_letter", d.record)) + sum(len(k) + len(v) for k, v in d.headers)
            size += len(d.record["error"][:1000].encode()) + len(d.message.encode())
        except Exception as exc:
            problems.append(f"dead letter does not encode: {type(exc).__name__}: {exc}")
            continue
        if size > BROKER_MESSAGE_LIMIT:
            problems.append(f"dead letter is {size} bytes, over the broker's limit")
    return problems


def check_one(source: str, data: bytes, codec: Codec, time_bound: float = TIME_BOUND_S) -> tuple[
        ingest.Batch | None, list[str], bool]:
    """(batch, problems, timed_out) for one input; a run over ``time_bound`` seconds is a timeout."""
    start = time.monotonic()
    _watch.started(start)
    try:
        ctx = c.Context(clock=lambda: 1_767_225_600_000)
        batch = ingest.normalize(source, data, ctx, name="fuzz")
    except BaseException as exc:  # noqa: BLE001 - anything escaping normalization is the finding
        return None, [f"normalization raised {''.join(traceback.format_exception_only(exc)).strip()}"], False
    finally:
        _watch.started(None)
    elapsed = time.monotonic() - start
    if elapsed > time_bound:
        return batch, [f"normalization took {elapsed:.1f}s, over {time_bound}s"], True
    return batch, broken_promises(batch, codec), False


class _Watchdog:
    """Ends the campaign when one input has run for far longer than the bound: a conversion in C cannot be cut."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.thread: threading.Thread | None = None
        self.bound = TIME_BOUND_S * 6
        self.line = ""

    def started(self, start: float | None) -> None:
        self.start = start

    def arm(self, line: Callable[[], str]) -> None:
        def watch() -> None:
            while True:
                time.sleep(1)
                begun = self.start
                if begun is not None and time.monotonic() - begun > self.bound:
                    print(f"fuzz: timeout: one input ran over {self.bound:.0f}s; the campaign stops here",
                          file=sys.stderr, flush=True)
                    print(line().replace("timeouts=0", "timeouts=1"), flush=True)
                    os._exit(1)
        self.thread = threading.Thread(target=watch, daemon=True, name="fuzz-watchdog")
        self.thread.start()


_watch = _Watchdog()


def run_normalization(tally: Tally, per_source: int, seed: int, sources: list[str], root: Path = FIXTURES,
                      say: Callable[[str], None] = print) -> None:
    """Mutate each source's seeds ``per_source`` times and check the promise on every input."""
    codec = Codec()
    for source in sources:
        rng = random.Random(f"{seed}:{source}")
        base = seeds(source, root)
        start, bugs = time.monotonic(), len(tally.findings)
        for _ in range(per_source):
            data = mutate(source, rng.choice(base), rng)
            batch, problems, timed_out = check_one(source, data, codec)
            tally.inputs += 1
            if batch is not None:
                tally.unexpected += batch.unplanned
            for p in problems:
                tally.findings.append(Finding(source, "timeout" if timed_out else "bug", p[:300], data))
        say(f"fuzz: {source}: {per_source} inputs, {len(tally.findings) - bugs} findings, "
            f"{time.monotonic() - start:.1f}s")


def sign(source: str, body: bytes, url_path: str, base_url: str) -> dict[str, str]:
    """The headers that make ``body`` an authentic webhook of ``source`` (the secrets of SECRETS)."""
    now = int(time.time())
    if source == "stripe":
        mac = hmac.new(SECRETS["STRIPE_WEBHOOK_SECRET"].encode(), f"{now}.".encode() + body, hashlib.sha256)
        return {"Stripe-Signature": f"t={now},v1={mac.hexdigest()}"}
    if source == "hubspot":
        ts = str(now * 1000)
        return {"X-HubSpot-Signature-v3": hubspot.sign_v3(SECRETS["HUBSPOT_CLIENT_SECRET"], "POST",
                                                          base_url + url_path, body, ts),
                "X-HubSpot-Request-Timestamp": ts}
    if source == "jobber":
        return {"X-Jobber-Hmac-SHA256": jobber.sign(SECRETS["JOBBER_WEBHOOK_SECRET"], body)}
    return {"Authorization": f"Bearer {SECRETS['SALESFORCE_WEBHOOK_TOKEN']}"}


@contextmanager
def receiver(bootstrap: str) -> Iterator[str]:
    """A live ``concord webhooks`` app on a loopback port, in a thread of its own; yields its base URL."""
    from aiohttp import web

    from concord.runtime.broker import free_port
    from connectors.inbound.webhooks import make_app

    loop = asyncio.new_event_loop()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    runner = web.AppRunner(make_app(bootstrap, env={**SECRETS, "CONCORD_WEBHOOK_PUBLIC_URL": base}, timeout_s=30))
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    if not started.wait(30):
        raise RuntimeError("the receiver did not start")
    try:
        yield base
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 60.0) -> tuple[int, bytes]:
    """POST ``body``; (status, response body), HTTP errors included."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_receiver(tally: Tally, bodies: int, seed: int, bootstrap: str, root: Path = FIXTURES,
                 say: Callable[[str], None] = print) -> None:
    """POST ``bodies`` signed hostile bodies over the four webhook sources; a 5xx or a non-JSON 4xx is a finding."""
    sources = ["stripe", "hubspot", "salesforce", "jobber"]
    rng = random.Random(f"{seed}:receiver")
    base_seeds = {s: seeds(s, root) for s in sources}
    start = time.monotonic()
    with receiver(bootstrap) as base:
        for n in range(bodies):
            source = sources[n % len(sources)]
            body = mutate(source, rng.choice(base_seeds[source]), rng)
            path = f"/webhooks/{source}"
            status, answer = post(base + path, body, sign(source, body, path, base))
            tally.bodies += 1
            if status >= 500:
                tally.findings.append(Finding(source, "server_5xx", f"{status}: {answer[:300]!r}", body))
            elif status >= 400:
                try:
                    json.loads(answer)
                except ValueError:
                    tally.findings.append(Finding(source, "bug", f"{status} without a JSON body", body))
    say(f"fuzz: receiver: {bodies} signed bodies, {time.monotonic() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; exit 0 when nothing broke the promise, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m connectors.inbound.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=10_000, help="mutated inputs per connector (default 10000)")
    p.add_argument("--bodies", type=int, default=2_000, help="signed bodies POSTed to the receiver (default 2000)")
    p.add_argument("--seed", type=int, default=13, help="random seed (default 13): the same seed, the same inputs")
    p.add_argument("--sources", default=",".join(SEEDS), help="connectors to fuzz, comma-separated")
    p.add_argument("--save", type=Path, help="write each finding's input to this directory")
    args = p.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(sources) - set(SEEDS))
    if unknown:
        print(f"fuzz: error: unknown sources {unknown}; choose from {sorted(SEEDS)}", file=sys.stderr)
        return 2
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    tally = Tally()
    _watch.arm(tally.line)
    run_normalization(tally, args.inputs, args.seed, sources, say=say)
    if args.bodies:
        from concord.contracts.topics import CHANGES, INGEST_DEADLETTERS
        from concord.runtime.broker import ensure_topics, open_broker

        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        with (open_broker() if not bootstrap else _given(bootstrap)) as broker:
            ensure_topics(broker.bootstrap_servers, [*CHANGES, *INGEST_DEADLETTERS])
            run_receiver(tally, args.bodies, args.seed, broker.bootstrap_servers, say=say)
    for f in tally.findings[:20]:
        say(f"fuzz: {f.kind}: {f.source}: {f.detail} (input sha256 {hashlib.sha256(f.data).hexdigest()[:16]}, "
            f"first bytes {base64.b64encode(f.data[:60]).decode()})")
    if args.save and tally.findings:
        args.save.mkdir(parents=True, exist_ok=True)
        for f in tally.findings:
            (args.save / f"{f.source}-{f.kind}-{hashlib.sha256(f.data).hexdigest()[:16]}").write_bytes(f.data)
    say(f"fuzz: {tally.unexpected} inputs were dead-lettered with a generic reason (a mapper's unplanned error)")
    print(tally.line(), flush=True)
    return 1 if tally.findings else 0


@contextmanager
def _given(bootstrap: str) -> Iterator[Any]:
    @dataclass
    class External:
        bootstrap_servers: str
    yield External(bootstrap)


if __name__ == "__main__":
    sys.exit(main())
