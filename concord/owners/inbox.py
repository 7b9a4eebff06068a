"""The owners' inbox as server-rendered HTML: pure functions from records to pages, no HTTP and no broker."""

from __future__ import annotations

import hashlib
import html
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from concord.owners.picture import Links, Step, money

OPEN_STATES = ("open", "acknowledged", "escalated")
STATES = (*OPEN_STATES, "resolved", "discarded")
PAGE_SIZE = 50
BULK_MAX = 5000  # one bulk action acts on at most this many exceptions
RUNBOOKS = Path(__file__).resolve().parents[2] / "ops" / "runbooks" / "reasons"
Amount = Callable[[dict[str, Any]], "int | None"]

e = html.escape


class BadFilter(ValueError):
    """A filter value the inbox cannot use; the message names the field."""


@dataclass(frozen=True)
class Filters:
    """What an owner asked to see: one inbox page's query string, parsed."""

    reason: str = ""
    state: str = ""  # "" = every open state
    scope: str = ""  # "" = the team's queue, "escalated" = what escalated to the team
    min_age_h: float | None = None
    customer: str = ""
    min_amount: float | None = None  # in currency units, as typed
    q: str = ""
    page: int = 1

    @classmethod
    def from_query(cls, query: Any) -> Filters:
        """Parse a query (any mapping of str); BadFilter says which field is wrong."""
        def number(name: str) -> float | None:
            raw = (query.get(name) or "").strip()
            if not raw:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise BadFilter(f"{name}: {raw!r} is not a number") from None
            if value < 0:
                raise BadFilter(f"{name}: must not be negative")
            return value

        state = (query.get("state") or "").strip()
        if state and state not in STATES:
            raise BadFilter(f"state: {state!r} is not one of {', '.join(STATES)}")
        scope = (query.get("scope") or "").strip()
        if scope not in ("", "escalated"):
            raise BadFilter(f"scope: {scope!r} is not one of: (empty), escalated")
        try:
            page = max(1, int(query.get("page") or 1))
        except ValueError:
            raise BadFilter(f"page: {query.get('page')!r} is not a number") from None
        return cls(reason=(query.get("reason") or "").strip(), state=state, scope=scope,
                   min_age_h=number("min_age_h"), customer=(query.get("customer") or "").strip(),
                   min_amount=number("min_amount"), q=(query.get("q") or "").strip(), page=page)

    def query(self, **changes: Any) -> dict[str, str]:
        """These filters (with ``changes``) as query parameters, leaving out what is unset."""
        data = asdict(replace(self, **changes))
        return {k: ("" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))) for k, v in data.items()
                if v not in (None, "") and not (k == "page" and v == 1)}


def select(records: Iterable[dict[str, Any]], team: str, f: Filters, now: int, amount: Amount) -> list[dict[str, Any]]:
    """The team's records matching ``f``, soonest SLA first (paging is left to the caller)."""
    needle = f.q.lower()
    out = []
    for r in records:
        if r.get("owner") != team:
            continue
        state = r.get("state")
        if f.scope == "escalated" and state != "escalated":
            continue
        if (f.state and state != f.state) or (not f.state and state not in OPEN_STATES):
            continue
        if f.reason and r.get("reason_code") != f.reason:
            continue
        if f.customer and f.customer.lower() not in (r.get("customer_id") or "").lower():
            continue
        if f.min_age_h is not None and now - r["opened_at"] < f.min_age_h * 3_600_000:
            continue
        if f.min_amount is not None:
            cents = amount(r)
            if cents is None or cents < f.min_amount * 100:
                continue
        if needle and needle not in _haystack(r):
            continue
        out.append(r)
    out.sort(key=lambda r: (r["sla_deadline"], r["exception_id"]))
    return out


def _haystack(r: dict[str, Any]) -> str:
    parts = [r.get("exception_id"), r.get("reason_code"), r.get("entity_id"), r.get("customer_id"), r.get("message"),
             r.get("trace_id"), r.get("assignee")]
    parts += [f"{s.get('value')} {s.get('label')}" for s in r.get("suggestions") or []]
    return " ".join(str(p) for p in parts if p).lower()


def digest(ids: Iterable[str]) -> str:
    """A short fingerprint of a set of exception ids: the set confirmed is the set acted on."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


# ---- the page frame --------------------------------------------------------------------------------------
def page(title: str, body: str, team: str | None = None, current: str = "") -> str:
    """A whole page: head with the vendored stylesheet and script, the team's navigation, then ``body``."""
    nav = ""
    if team:
        links = [("inbox", "/inbox", "Inbox"), ("reconciliation", "/inbox/reconciliation", "Reconciliation"),
                 ("checklist", "/inbox/checklist", "Checklist")]
        items = "".join(f'<a href="{href}"{" aria-current=page" if key == current else ""}>{label}</a>'
                        for key, href, label in links)
        nav = (f'<nav aria-label="Workspace">{items}<span class=team>signed in as <b>{e(team)}</b></span>'
               '<form method=post action=/inbox/logout class=inline><button>Sign out</button></form></nav>')
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><link rel=stylesheet href=/inbox/static/workspace.css>"
            "<script src=/inbox/static/workspace.js defer></script></head>"
            f"<body>{nav}<main><h1>{e(title)}</h1>{body}</main></body></html>")


LOGIN = ('<form method=post action=/inbox/login class=login><label for=token>Team credential</label> '
         '<input type=password name=token id=token autocomplete=off required> '
         '<label for=user>Your name <small>(kept with what you do)</small></label> '
         '<input name=user id=user autocomplete=name maxlength=80> <button id=login>Sign in</button></form>')


def _when(deadline: int, now: int) -> str:
    left = (deadline - now) / 60_000
    if left >= 0:
        return f"<span class=sla>{_dur(left)} left</span>"
    return f"<span class='sla late'>{_dur(-left)} past SLA</span>"


def _dur(minutes: float) -> str:
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} d"


def ts(ms: int | None) -> str:
    """A timestamp in UTC, to the second."""
    if ms is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def _options(values: Iterable[str], chosen: str, blank: str) -> str:
    out = [f'<option value=""{" selected" if not chosen else ""}>{e(blank)}</option>']
    out += [f'<option value="{e(v)}"{" selected" if v == chosen else ""}>{e(v)}</option>' for v in values]
    return "".join(out)


# ---- the inbox list -------------------------------------------------------------------------------------
def render_inbox(team: str, records: list[dict[str, Any]], f: Filters, now: int, amount: Amount,
                 currency: Callable[[dict[str, Any]], str | None], msg: str = "", error: str = "") -> str:
    """The team's inbox page: filters, search, bulk actions, one page of matching items, paging."""
    reasons = sorted({r["reason_code"] for r in records if r.get("owner") == team})
    matching = select(records, team, f, now, amount)
    pages = max(1, -(-len(matching) // PAGE_SIZE))
    number = min(f.page, pages)
    shown = matching[(number - 1) * PAGE_SIZE:number * PAGE_SIZE]
    escalated = sum(1 for r in records if r.get("owner") == team and r.get("state") == "escalated")
    parts = []
    if msg:
        parts.append(f'<p id=msg role=status class=msg>{e(msg)}</p>')
    if error:
        parts.append(f'<p id=error role=alert class=err>{e(error)}</p>')
    parts.append(_tabs(f, escalated))
    parts.append(_filter_form(f, reasons))
    total_at_risk = [amount(r) for r in matching]
    known = [c for c in total_at_risk if c is not None]
    parts.append(f'<p id=count>{len(matching)} matching, soonest SLA first · at risk '
                 f'<b>{money(sum(known)) if known else "—"}</b>'
                 f'{f" ({len(total_at_risk) - len(known)} without an amount)" if len(known) < len(matching) else ""}'
                 f'</p>')
    parts.append(_bulk_form(f, len(matching)))
    if not shown:
        parts.append("<p class=empty>Nothing matches these filters.</p>")
    else:
        parts.append('<table id=queue><caption class=sr>Exceptions</caption><thead><tr><th scope=col>SLA</th>'
                     "<th scope=col>Reason</th><th scope=col>Customer</th><th scope=col>Record</th>"
                     "<th scope=col class=num>At risk</th><th scope=col>State</th><th scope=col>Assignee</th>"
                     "<th scope=col>What is wrong</th><th scope=col>Quick fix</th></tr></thead><tbody>")
        for r in shown:
            eid = e(r["exception_id"])
            href = f"/inbox/item/{eid}?" + e(urlencode({"customer": r.get("customer_key", "")}))
            parts.append(
                f'<tr id="x-{eid}" data-reason="{e(r["reason_code"])}"><td>{_when(r["sla_deadline"], now)}</td>'
                f'<td><span class="tag sev-{e(r.get("severity", ""))}">{e(r["reason_code"])}</span></td>'
                f'<td>{e(r.get("customer_id") or "unknown")}</td>'
                f'<td><a class=open href="{href}">{e(r["entity_type"])} {e(r["entity_id"])}</a></td>'
                f'<td class=num>{e(money(amount(r), currency(r)))}</td><td>{e(r["state"])}</td>'
                f'<td>{e(r.get("assignee") or "—")}</td><td class=msgcol>{e(r["message"])}</td>'
                f"<td>{_quick_fix(r)}</td></tr>")
        parts.append("</tbody></table>")
    parts.append(_pager(f, number, pages))
    return "".join(parts)


def _quick_fix(r: dict[str, Any]) -> str:
    """Take one of an item's suggestions from the list itself (the item's page has every other action)."""
    options = r.get("suggestions") or []
    if not options or r.get("state") not in OPEN_STATES:
        return ""
    eid = e(r["exception_id"])
    radios = "".join(f'<label><input type=radio name=choose value={i}{" checked" if i == 1 else ""}> '
                     f'{e(s["field"])} = <b>{e(s["value"])}</b></label> ' for i, s in enumerate(options[:3], 1))
    return (f'<form method=post action=/inbox class=resolve><input type=hidden name=exception_id value="{eid}">'
            f'<input type=hidden name=customer value="{e(r.get("customer_key", ""))}">'
            f'<input type=hidden name=action value=resolve>{radios}'
            '<button class=resolve-btn>Resolve</button></form>')


def _tabs(f: Filters, escalated: int) -> str:
    mine = "/inbox?" + urlencode(f.query(scope="", page=1))
    esc = "/inbox?" + urlencode(f.query(scope="escalated", page=1))
    return (f'<p class=tabs><a href="{e(mine)}"{" aria-current=page" if not f.scope else ""}>Our queue</a> '
            f'<a id=tab-escalated href="{e(esc)}"{" aria-current=page" if f.scope else ""}>Escalated to us '
            f"({escalated})</a></p>")


def _filter_form(f: Filters, reasons: list[str]) -> str:
    age = "" if f.min_age_h is None else f"{f.min_age_h:g}"
    amount = "" if f.min_amount is None else f"{f.min_amount:g}"
    return (
        '<form method=get action=/inbox id=filters class=filters role=search>'
        f'<input type=hidden name=scope value="{e(f.scope)}">'
        f'<label>Search <input type=search name=q id=q value="{e(f.q)}" placeholder="id, SKU, message…"></label>'
        f'<label>Reason <select name=reason id=f-reason>{_options(reasons, f.reason, "any reason")}</select></label>'
        f'<label>State <select name=state id=f-state>{_options(STATES, f.state, "any open")}</select></label>'
        f'<label>Older than (h) <input name=min_age_h id=f-age inputmode=decimal size=4 value="{e(age)}"></label>'
        f'<label>Customer <input name=customer id=f-customer size=12 value="{e(f.customer)}"></label>'
        f'<label>At risk ≥ <input name=min_amount id=f-amount inputmode=decimal size=6 value="{e(amount)}"></label>'
        '<button id=apply>Apply</button> <a href=/inbox>Clear</a></form>')


def _hidden(params: dict[str, str]) -> str:
    return "".join(f'<input type=hidden name="{e(k)}" value="{e(v)}">' for k, v in params.items())


def _bulk_form(f: Filters, count: int) -> str:
    if not count:
        return ""
    return (
        '<details class=bulk><summary id=bulk-open>Bulk action on these '
        f'{count} exceptions</summary><form method=post action=/inbox/bulk id=bulk>{_hidden(f.query(page=1))}'
        '<fieldset><legend>What to do with every matching exception</legend>'
        '<label><input type=radio name=op value=replay checked id=op-replay> Replay: resolve each with its first '
        'suggestion (gaps are released, rejected commands sent again)</label><br>'
        '<label><input type=radio name=op value=resolve id=op-resolve> Resolve each with the same patch</label> '
        '<label>field=value <input name=set id=bulk-set size=30 placeholder="sku:OLD-SKU=SVC-INSTALL"></label><br>'
        '<label><input type=radio name=op value=discard id=op-discard> Discard each</label> '
        '<label>why <input name=note id=bulk-note size=30></label></fieldset>'
        '<button id=bulk-dry-run>Count first (dry run)</button></form></details>')


def _pager(f: Filters, number: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = []
    if number > 1:
        links.append(f'<a rel=prev href="/inbox?{e(urlencode(f.query(page=number - 1)))}">← Previous</a>')
    links.append(f"<span>page {number} of {pages}</span>")
    if number < pages:
        links.append(f'<a rel=next id=next href="/inbox?{e(urlencode(f.query(page=number + 1)))}">Next →</a>')
    return f'<nav class=pager aria-label=Pages>{" ".join(links)}</nav>'


# ---- bulk: dry run, then confirmation ------------------------------------------------------------------------
def render_bulk_dry_run(f: Filters, op: str, sets: str, note: str, matching: list[dict[str, Any]]) -> str:
    """The dry run's page: how many exceptions the action would touch, which, and a confirmation button."""
    ids = [r["exception_id"] for r in matching]
    by_reason: dict[str, int] = {}
    for r in matching:
        by_reason[r["reason_code"]] = by_reason.get(r["reason_code"], 0) + 1
    what = {"replay": "replay (each with its first suggestion)", "resolve": f"resolve with {sets or '(no patch)'}",
            "discard": f"discard ({note or 'no reason given'})"}[op]
    rows = "".join(f"<li>{e(k)}: {v}</li>" for k, v in sorted(by_reason.items()))
    sample = "".join(f"<li><code>{e(r['exception_id'])}</code> {e(r['reason_code'])} {e(r['entity_type'])} "
                     f"{e(r['entity_id'])}</li>" for r in matching[:20])
    more = f"<li>… and {len(matching) - 20} more</li>" if len(matching) > 20 else ""
    if len(matching) > BULK_MAX:
        return (f'<p id=dry-run class=err>{len(matching)} exceptions match: more than {BULK_MAX} at once. '
                "Narrow the filters.</p>")
    hidden = _hidden({**f.query(page=1), "op": op, "set": sets, "note": note, "confirm": "1",
                      "expect": str(len(ids)), "digest": digest(ids)})
    back = "/inbox?" + urlencode(f.query(page=1))
    return (f'<p id=dry-run>Dry run: <b id=dry-run-count>{len(ids)}</b> exceptions match; nothing has changed yet.</p>'
            f"<p>Action: {e(what)}.</p><ul>{rows}</ul><details><summary>Which</summary><ul>{sample}{more}</ul>"
            f'</details><form method=post action=/inbox/bulk>{hidden}<button id=bulk-confirm>Confirm: {e(op)} '
            f'{len(ids)} exceptions</button> <a href="{e(back)}">Cancel</a></form>')


def render_bulk_result(op: str, accepted: list[str], refused: list[tuple[str, str]], back: str) -> str:
    """What a confirmed bulk action did: how many were accepted, and each refusal with its reason."""
    rows = "".join(f"<li><code>{e(eid)}</code>: {e(why)}</li>" for eid, why in refused)
    return (f'<p id=bulk-result role=status><b id=bulk-accepted>{len(accepted)}</b> accepted for {e(op)}, '
            f'<b id=bulk-refused>{len(refused)}</b> refused. Each closes when its replay succeeds.</p>'
            f'{f"<ul class=refusals>{rows}</ul>" if rows else ""}<p><a href="{e(back)}">Back to the inbox</a></p>')


# ---- one item -----------------------------------------------------------------------------------------------
def render_item(team: str, rec: dict[str, Any], now: int, picture: list[Step], at_risk: str, links: Links,
                status: dict[str, Any] | None, original: dict[str, Any] | None, runbook: str | None,
                msg: str = "") -> str:
    """One exception: what is wrong, the money, the customer across systems, links, history, runbook, actions."""
    open_ = rec["state"] in OPEN_STATES
    customer = ((status or {}).get("customer") or {})
    parts = [f'<p id=msg role=status class=msg>{e(msg)}</p>' if msg else "",
             f'<p><a href="/inbox">← Inbox</a></p><section id=summary aria-labelledby=h-summary>'
             f'<h2 id=h-summary>{e(rec["reason_code"])} · {e(rec["entity_type"])} {e(rec["entity_id"])}</h2>'
             f'<p class=what id=what>{e(rec["message"])}</p><dl class=facts>'
             f'<dt>At risk</dt><dd id=at-risk>{e(at_risk)}</dd>'
             f'<dt>State</dt><dd id=state>{e(rec["state"])}</dd>'
             f'<dt>SLA</dt><dd>{ts(rec["sla_deadline"])} ({_when(rec["sla_deadline"], now)})</dd>'
             f'<dt>Owner</dt><dd>{e(rec["owner"])} (backup {e(rec.get("backup_owner") or "—")})</dd>'
             f'<dt>Assignee</dt><dd id=assignee>{e(rec.get("assignee") or "—")}</dd>'
             f'<dt>Severity</dt><dd>{e(rec.get("severity", ""))}'
             f'{" · blocks billing" if rec.get("blocks_billing") else ""}'
             f'</dd><dt>Customer</dt><dd>{e(rec.get("customer_id") or "unknown")} {e(customer.get("name") or "")}'
             f'</dd><dt>Trace</dt><dd><code>{e(rec["trace_id"])}</code></dd></dl></section>']
    parts.append(_picture(picture, rec, customer, links))
    parts.append(_suggestions_and_actions(rec, open_) if open_ else "")
    parts.append(_history(rec))
    parts.append(_original(rec, original))
    parts.append('<section id=runbook aria-labelledby=h-runbook><h2 id=h-runbook>Runbook: '
                 f'{e(rec["reason_code"])}</h2>'
                 f'{markdown_html(runbook) if runbook else "<p>No runbook for this reason yet.</p>"}</section>')
    return "".join(parts)


def _picture(picture: list[Step], rec: dict[str, Any], customer: dict[str, Any], links: Links) -> str:
    rows = []
    for s in picture:
        here = s.kind == rec["entity_type"] and s.entity_id == rec["entity_id"]
        name = f'<a href="{e(s.link)}" rel=noreferrer>{e(s.entity_id)}</a>' if s.link else e(s.entity_id)
        rows.append(f'<tr class="step depth-{s.depth}{" here" if here else ""}" data-kind={e(s.kind)}>'
                    f'<td>{"↳ " * (s.depth > 0)}{e(s.kind)}</td><td>{name}</td><td>{e(s.position)}</td>'
                    f'<td class=num>{e(money(s.amount_cents, s.currency))}</td></tr>')
    table = ("<table id=picture><thead><tr><th scope=col>Record</th><th scope=col>Id</th><th scope=col>Position"
             "</th><th scope=col class=num>Amount</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
             ) if rows else "<p id=picture>Concord knows no deal, job, invoice or payment of this customer yet.</p>"
    sources = []
    if rec.get("customer_id") and links.of("customer", rec["customer_id"]):
        sources.append(f'<li>CRM account: <a href="{e(links.of("customer", rec["customer_id"]) or "")}" '
                       f'rel=noreferrer>{e(rec["customer_id"])}</a></li>')
    own = links.of(rec["entity_type"], rec["entity_id"])
    if own and rec["entity_type"] != "customer":
        sources.append(f'<li>This {e(rec["entity_type"])}: <a href="{e(own)}" rel=noreferrer>{e(rec["entity_id"])}'
                       "</a></li>")
    for system, ident, url in links.external_ids(customer.get("external_ids") or {}):
        shown = f'<a href="{e(url)}" rel=noreferrer>{e(ident)}</a>' if url else e(ident)
        sources.append(f"<li>{e(system)}: {shown}</li>")
    links_html = f'<ul id=links>{"".join(sources)}</ul>' if sources else "<p id=links>No source links configured.</p>"
    return ('<section aria-labelledby=h-picture><h2 id=h-picture>The customer across systems</h2>'
            '<p class=hint>deal → job → invoice → payment, with where each stands</p>'
            f'{table}<h3>In the source systems</h3>{links_html}</section>')


def _suggestions_and_actions(rec: dict[str, Any], open_: bool) -> str:
    eid = e(rec["exception_id"])
    base = f"/inbox/item/{eid}/act?" + e(urlencode({"customer": rec.get("customer_key", "")}))
    options = "".join(
        f'<li><label><input type=radio name=choose value={i}{" checked" if i == 1 else ""}> '
        f'<code>{e(s["field"])}</code> = <b>{e(s["value"])}</b> <small>{e(s.get("label", ""))}'
        f'{_score(s)}</small></label></li>'
        for i, s in enumerate(rec.get("suggestions") or [], 1))
    choices = (f"<ul class=suggestions>{options}</ul>" if options
               else "<p>No suggestion: set the value yourself.</p>")
    return (
        '<section id=actions aria-labelledby=h-actions><h2 id=h-actions>Fix it</h2>'
        f'<form method=post action="{base}" class=resolve><input type=hidden name=action value=resolve>'
        f'<fieldset><legend>Resolve and replay</legend>{choices}'
        '<label>or set field=value (one a line) <textarea name=set rows=2 cols=40 id=set></textarea></label>'
        '<label>note <input name=note></label> <button class=resolve-btn id=resolve>Resolve</button></fieldset></form>'
        f'<form method=post action="{base}" class=inline><input type=hidden name=action value=acknowledge>'
        '<button id=ack>Acknowledge</button></form>'
        f'<form method=post action="{base}" class=inline><input type=hidden name=action value=assign>'
        f'<label>assign to <input name=assignee id=assignee-input size=14 value="{e(rec.get("assignee") or "")}">'
        '</label> <button id=assign>Assign</button></form>'
        f'<form method=post action="{base}" class=inline><input type=hidden name=action value=discard>'
        '<label>why <input name=note id=discard-note required></label> <button id=discard>Discard</button></form>'
        '</section>')


def _score(s: dict[str, Any]) -> str:
    return f" · score {s['score']:.2f}" if s.get("score") else ""


def _history(rec: dict[str, Any]) -> str:
    steps = rec.get("history") or [{"at": rec["opened_at"], "step": "opened", "owner": rec["owner"], "by": None}]
    rows = []
    for h in steps:
        who = f" by {e(h['by'])}" if h.get("by") else ""
        extra = f" → {e(h['assignee'])}" if h.get("step") == "assigned" and h.get("assignee") else ""
        owner = f" ({e(h.get('owner') or '')})" if h.get("step") in ("opened", "escalated") else ""
        rows.append(f"<li><time>{ts(h.get('at'))}</time> <b>{e(h.get('step', ''))}</b>{extra}{owner}{who}</li>")
    res = rec.get("resolution")
    if res and res.get("patch"):
        rows.append(f"<li>patch <code>{e(json.dumps(res['patch'], sort_keys=True))}</code> "
                    f"{e(res.get('note') or '')}</li>")
    return ('<section aria-labelledby=h-history><h2 id=h-history>History</h2>'
            f'<ol id=history>{"".join(rows)}</ol></section>')


def _original(rec: dict[str, Any], decoded: dict[str, Any] | None) -> str:
    orig = rec.get("original")
    if not orig:
        return ('<section aria-labelledby=h-original><h2 id=h-original>Original event</h2>'
                "<p>This exception was not raised by one event (for example a gap or a time-driven check).</p>"
                "</section>")
    where = f"{e(orig['topic'])} partition {orig['partition']} offset {orig['offset']}"
    body = (f"<pre id=original>{e(json.dumps(decoded, indent=2, sort_keys=True, default=str))}</pre>" if decoded
            else "<p>Not decodable here; its bytes (hex):</p>"
            f"<pre id=original>{e(str(orig.get('value', ''))[:4000])}</pre>")
    return (f'<section aria-labelledby=h-original><h2 id=h-original>Original event</h2><p>{where}</p>'
            f"<details open><summary>Record</summary>{body}</details></section>")


# ---- runbooks -----------------------------------------------------------------------------------------------
def runbook_text(reason: str, directory: Path = RUNBOOKS) -> str | None:
    """The runbook for a reason code (ops/runbooks/reasons/<reason>.md), or None if there is none."""
    if not re.fullmatch(r"[a-z0-9_]+", reason):
        return None
    try:
        return (directory / f"{reason}.md").read_text()
    except OSError:
        return None


def markdown_html(text: str) -> str:
    """The small part of Markdown the runbooks use (headings, lists, code, emphasis, links) as escaped HTML."""
    out: list[str] = []
    lists: list[str] = []
    fence = False
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    def close_lists() -> None:
        while lists:
            out.append(f"</{lists.pop()}>")

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("```"):
            flush()
            close_lists()
            out.append("</code></pre>" if fence else "<pre><code>")
            fence = not fence
            continue
        if fence:
            out.append(e(line) + "\n")
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        item = re.match(r"\s*([-*]|\d+\.)\s+(.*)", line)
        if heading:
            flush()
            close_lists()
            level = min(6, len(heading.group(1)) + 2)  # the page's own headings come first
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif item:
            flush()
            kind = "ol" if item.group(1)[0].isdigit() else "ul"
            if not lists or lists[-1] != kind:
                close_lists()
                out.append(f"<{kind}>")
                lists.append(kind)
            out.append(f"<li>{_inline(item.group(2))}</li>")
        elif not line.strip():
            flush()
            close_lists()
        else:
            if lists:
                close_lists()
            para.append(line.strip())
    flush()
    close_lists()
    if fence:
        out.append("</code></pre>")
    return "".join(out)


def _inline(text: str) -> str:
    text = e(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f"{m.group(1)} (<code>{m.group(2)}</code>)", text)
