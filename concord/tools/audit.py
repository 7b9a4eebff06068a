"""``concord audit``: today's exports through the same connectors and rules, in process, to where systems disagree.

Exports are mapped (concord/tools/audit_exports.py), fed through the in-process topology (guard, status table,
flow rules; no broker), and what the rules warrant is compared with what the exports show
(concord/domain/reconcile.py). The report is written as one offline HTML file, JSON and a CSV of items.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from concord.domain.flow_config import FlowConfig, load_flow_config
from concord.domain.reconcile import Finding, findings
from concord.domain.routing import Routing, load_routing
from concord.runtime.harness import InProcess
from concord.tools import audit_exports
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import DeadLetter

EXIT_CLEAN, EXIT_DISAGREE, EXIT_UNREADABLE = 0, 1, 2
ITEM_COLUMNS = ("kind", "owner", "severity", "customer_id", "entity_type", "entity_id", "amount_cents", "currency",
                "age_days", "source_of_truth", "fix", "message", "crm", "dispatch", "billing", "trace_id")


@dataclass
class Audit:
    """What an audit read and found."""

    as_of: int
    files: list[dict[str, Any]] = field(default_factory=list)  # name, format, events, rejected
    unreadable: list[DeadLetter] = field(default_factory=list)
    items: list[Finding] = field(default_factory=list)
    customers: int = 0
    events: int = 0

    def age_days(self, f: Finding) -> float:
        """How long the record a finding is about has been as it is, in days."""
        return round(max(0, self.as_of - (f.since or self.as_of)) / 86_400_000, 1)

    def to_json(self) -> dict[str, Any]:
        """The whole report as JSON-ready data (dead letters carry their original bytes, base64)."""
        return {
            "as_of": self.as_of, "customers": self.customers, "events": self.events, "files": self.files,
            "summary": summarize(self.items),
            "items": [{**asdict(f), "age_days": self.age_days(f)} for f in self.items],
            "unreadable": [{"where": d.where, "error": d.record["error"],
                            "original_base64": base64.b64encode(d.record["original_value"] or b"").decode()}
                           for d in self.unreadable],
        }


def summarize(items: list[Finding]) -> dict[str, Any]:
    """Counts and money by kind and by owner."""
    by_kind: dict[str, dict[str, int]] = {}
    by_owner: dict[str, dict[str, int]] = {}
    for f in items:
        for table, key in ((by_kind, f.kind), (by_owner, f.owner)):
            row = table.setdefault(key, {"count": 0, "amount_cents": 0})
            row["count"] += 1
            row["amount_cents"] += f.amount_cents
    return {"items": len(items), "amount_cents": sum(f.amount_cents for f in items),
            "by_kind": dict(sorted(by_kind.items())), "by_owner": dict(sorted(by_owner.items()))}


def order_key(fmt: str) -> int:
    """Exports that teach the identity map (the CRM's accounts) are read first."""
    names = [f.name for f in audit_exports.FORMATS if f.links] + [f.name for f in audit_exports.FORMATS]
    return names.index(fmt) if fmt in names else len(names)


def run_audit(paths: list[str | Path], cfg: FlowConfig | None = None, routing: Routing | None = None,
              as_of: int | None = None, fmt: str | None = None) -> Audit:
    """Read, map and decide every export; return the findings and whatever could not be read."""
    as_of = as_of if as_of is not None else int(time.time() * 1000)
    routing = routing or load_routing()
    audit = Audit(as_of)
    ctx = c.Context(identity=IdentityMap(None), clock=lambda: as_of)
    loaded: list[tuple[str, str, bytes]] = []
    for p in paths:
        name = str(p)
        try:
            data = Path(p).read_bytes()
            loaded.append((name, fmt or audit_exports.detect(data, name), data))
        except OSError as exc:
            audit.unreadable.append(_unreadable(name, f"cannot read {name}: {exc.strerror or exc}", b"", as_of))
        except c.BadInput as exc:
            audit.unreadable.append(_unreadable(name, str(exc), b"", as_of))
    harness = InProcess(cfg, routing, now=as_of)
    for name, kind, data in sorted(loaded, key=lambda x: order_key(x[1])):
        try:
            batch = audit_exports.read(kind, data, ctx, name)
        except (c.BadInput, UnicodeDecodeError, ValueError) as exc:
            audit.unreadable.append(_unreadable(name, f"{name}: {exc}", data, as_of))
            continue
        audit.files.append({"name": name, "format": kind, "events": len(batch.events),
                            "rejected": len(batch.deadletters)})
        audit.unreadable += batch.deadletters
        for m in batch.events:
            harness.feed_event(m.event)
        audit.events += len(batch.events)
    audit.customers = sum(1 for k in harness.statuses if not k.startswith(b"unknown:"))
    audit.items = findings(harness.statuses, harness.commands(), harness.exceptions(), routing)
    return audit


def _unreadable(name: str, error: str, raw: bytes, now: int) -> DeadLetter:
    return DeadLetter(None, {"original_topic": f"audit.{name}", "original_partition": -1, "original_offset": -1,
                             "original_key": None, "original_value": raw, "stage": "read", "error_type": "BadInput",
                             "error": error, "failed_at": now}, name)


def write_outputs(audit: Audit, out: Path) -> dict[str, Path]:
    """report.html, report.json and items.csv under ``out``."""
    from concord.tools.audit_report import render

    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "json": out / "report.json", "csv": out / "items.csv"}
    paths["json"].write_text(json.dumps(audit.to_json(), indent=1, sort_keys=True) + "\n")
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(ITEM_COLUMNS)
        for f in audit.items:
            row = {**asdict(f), "age_days": audit.age_days(f), **{s: f.evidence.get(s, "") for s in
                                                                   ("crm", "dispatch", "billing")}}
            w.writerow([row[col] for col in ITEM_COLUMNS])
    paths["html"].write_text(render(audit))
    return paths


def check_example(audit: Audit, injected: list[tuple[str, str, str]]) -> tuple[int, int, list[Any], list[Any]]:
    """(found, expected, missed, invented) of the example set's injected disagreements."""
    got = {f.key for f in audit.items}
    want = set(injected)
    return len(want & got), len(want), sorted(want - got), sorted(got - want)


def run(args: argparse.Namespace) -> int:
    """The ``concord audit`` command."""
    if args.from_apis:
        print("concord audit: error: --from-apis needs the fetch layer (vendor list clients), which Concord does "
              "not have yet; download the exports and pass them as FILES", file=sys.stderr)
        return EXIT_UNREADABLE
    if not args.example and not args.files:
        print("concord audit: error: give export FILES, or --example", file=sys.stderr)
        return EXIT_UNREADABLE
    cfg = load_flow_config(args.flows) if args.flows else None
    routing = load_routing(args.routing) if args.routing else None
    as_of = c.to_ms(args.as_of, "--as-of") if args.as_of else None
    injected: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="concord-audit-") as tmp:
        files: list[str | Path] = list(args.files)
        if args.example:
            from concord.tools.audit_example import write_example

            paths, injected, end = write_example(Path(args.out) / "exports" if args.out else tmp)
            files, as_of = [*paths, *files], as_of or end
        audit = run_audit(files, cfg, routing, as_of, args.format)
    out = Path(args.out or "audit-report")
    written = write_outputs(audit, out)
    for d in audit.unreadable:
        print(f"concord audit: error: {d.where}: {d.record['error']}", file=sys.stderr)
    summary = summarize(audit.items)
    print(f"audit: {audit.events} records of {audit.customers} customers from {len(audit.files)} file(s); "
          f"{summary['items']} disagreement(s), {summary['amount_cents'] / 100:,.2f} at risk")
    for kind, row in summary["by_kind"].items():
        print(f"  {kind:<26} {row['count']:>4}  {row['amount_cents'] / 100:>12,.2f}")
    print(f"report: {written['html']} (also {written['json'].name}, {written['csv'].name})")
    if args.example:
        found, expected, missed, invented = check_example(audit, injected)
        print(f"audit: found {found}/{expected} injected disagreements"
              + (f"; missed {missed}" if missed else "") + (f"; not injected {invented}" if invented else ""))
        return EXIT_UNREADABLE if audit.unreadable else EXIT_CLEAN if not missed and not invented else EXIT_DISAGREE
    if audit.unreadable:
        return EXIT_UNREADABLE
    return EXIT_DISAGREE if audit.items else EXIT_CLEAN


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord audit``."""
    p = sub.add_parser(
        "audit", help="find where CRM, dispatch and billing disagree, from today's exports (no broker)",
        description="Read exports (Salesforce and HubSpot CSV reports, Jobber job exports, Stripe invoice and "
        "payment exports or list-API JSON, a Debezium snapshot, the generic spreadsheet, canonical events), map "
        "them with Concord's connectors, run them through the flow rules in process and report every "
        "disagreement with its owner, money, age, evidence from each system, source of truth and fix. Writes "
        "report.html (one offline file), report.json and items.csv. Exit status: 0 no disagreement; 1 "
        "disagreements found; 2 input that could not be read (file and row named on stderr). With --example: "
        "0 when exactly the injected disagreements were found.")
    p.add_argument("files", nargs="*", metavar="FILE", help="export files (format detected from header or shape)")
    p.add_argument("--example", action="store_true",
                   help="audit the bundled example set (simulated month with injected disagreements)")
    p.add_argument("--out", help="directory for report.html, report.json, items.csv (default audit-report)")
    p.add_argument("--format", choices=[*audit_exports.BY_NAME, *audit_exports.OTHER_FORMATS],
                   help="read every FILE as this format instead of detecting it")
    p.add_argument("--flows", help="flows.yaml to audit against (default: the one a worker would load)")
    p.add_argument("--routing", help="routing.yaml to route findings with (default: the one a worker would load)")
    p.add_argument("--as-of", help="the audit's 'now' for aging (ISO date-time; default now)")
    p.add_argument("--from-apis", action="store_true", help="list records through the vendors' APIs (needs the "
                   "fetch layer; not available yet)")
    p.set_defaults(func=run)
