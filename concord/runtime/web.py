"""The owners' HTTP API (/exceptions...) and workspace (/inbox...) as thin faust views over the Desk."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import faust
from aiohttp import web as aioweb
from faust.web import View

from concord.exceptions import ConcordError
from concord.owners import checklist as checks
from concord.owners import inbox, reconcile
from concord.owners.desk import Desk, Refused
from concord.owners.picture import amount_at_risk, chain, currency_of, load_links, money
from concord.runtime import metrics

STATIC = Path(__file__).resolve().parent.parent / "owners" / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
BULK_OPS = ("replay", "resolve", "discard")
log = logging.getLogger("concord.web")
# Pages load only what the worker itself serves: no CDN, no inline script, no framing by other sites.
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def _html(view: View, body: str, status: int = 200) -> Any:
    return view.html(body, status=status, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})


def _samples() -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for m in metrics.REGISTRY.collect() for s in m.samples]


@aioweb.middleware
async def unexpected_errors(request: Any, handler: Any) -> Any:
    """A view that fails unexpectedly is logged with its traceback and answers 500 naming the error.

    Without it aiohttp answers a bare "Internal Server Error", and a caller cannot tell a fault from another.
    """
    try:
        return await handler(request)
    except aioweb.HTTPException:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return aioweb.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, status=500)


def register_views(app: faust.App, desk: Desk) -> None:
    """The HTTP API (/exceptions...) and the owners' workspace (/inbox...) on the worker's web server."""
    app.web.web_app.middlewares.append(unexpected_errors)  # type: ignore[attr-defined]
    links = load_links()

    def refused(view: View, exc: Refused) -> Any:
        return view.json({"error": str(exc)}, status=exc.status)

    def user_of(request: Any) -> str | None:
        return request.query.get("user") or unquote(request.cookies.get("concord_user", "")) or None

    def pricing() -> tuple[Any, Any]:
        """amount(rec) and currency(rec) from each record and its customer's status, where this worker holds it."""
        cache: dict[str, Any] = {}

        def status(r: dict[str, Any]) -> Any:
            ckey = r.get("customer_key") or ""
            if ckey not in cache:
                cache[ckey] = desk.statuses.get(ckey.encode()) if ckey else None
            return cache[ckey]

        return (lambda r: amount_at_risk(r, status(r))), (lambda r: currency_of(r, status(r)))

    async def everyone(request: Any) -> list[dict[str, Any]]:
        return await desk.gathered(request, desk.everything(), {"all": "1"})

    @app.page("/exceptions")
    class ExceptionList(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
                if request.query.get("all"):  # every team's records, for the cross-team summaries
                    if request.query.get("local"):
                        return self.json(desk.everything())
                    return self.json(await everyone(request))
                owner = request.query.get("owner")
                if owner and owner != team:
                    raise Refused(403, f"{team} may list its own queue only, not {owner}'s")
                queue = desk.queue(team, request.query.get("reason"), request.query.get("state"))
                if not request.query.get("local"):  # the table is spread over the workers: ask the others too
                    queue = await desk.gathered(request, queue, dict(request.query))
                return self.json(queue)
            except Refused as exc:
                return refused(self, exc)

    @app.page("/assignments/{exception_id}")
    class Assignment(View):
        async def post(self, request: Any, exception_id: str) -> Any:
            try:
                team = desk.team_of(request)
                result = await desk.assign_anywhere(desk.token_of(request), team, exception_id,
                                                    request.query.get("assignee", ""), user_of(request))
                return self.json(result, status=202)
            except Refused as exc:
                return refused(self, exc)

    @app.page("/exceptions/{exception_id}")
    class ExceptionOne(View):
        @app.table_route(table=desk.exceptions, match_info="exception_id")
        async def get(self, request: Any, exception_id: str) -> Any:
            try:
                return self.json(desk.one(desk.team_of(request), exception_id))
            except Refused as exc:
                return refused(self, exc)

    @app.page("/exceptions/{exception_id}/{action}")
    class ExceptionAct(View):
        @app.table_route(table=desk.statuses, query_param="customer")
        async def post(self, request: Any, exception_id: str, action: str) -> Any:
            try:
                team = desk.team_of(request)
                q = request.query
                result = await desk.act(team, exception_id, action, q.get("customer", ""), q.getall("set", []),
                                        q.get("choose"), q.get("note", ""), q.get("user"))
                return self.json(result, status=202)
            except Refused as exc:
                return refused(self, exc)

    def back(location: str, **query: str) -> Any:
        sep = "&" if "?" in location else "?"
        return {"Location": location + (sep + urlencode(query) if query else "")}

    @app.page("/inbox")
    class Inbox(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
            except Refused:
                return _html(self, inbox.page("Concord inbox", inbox.LOGIN))
            try:
                f = inbox.Filters.from_query(request.query)
            except inbox.BadFilter as exc:
                f, error = inbox.Filters(), str(exc)
            else:
                error = ""
            try:
                local = desk.queue(team, None, f.state or None)
                records = await desk.gathered(request, local, {"state": f.state} if f.state else {})
            except Refused as exc:
                records, error = desk.queue(team, None, f.state or None), f"{exc} (showing this worker's part)"
            amount, currency = pricing()
            body = inbox.render_inbox(team, records, f, int(time.time() * 1000), amount, currency,
                                      request.query.get("msg", ""), error)
            return _html(self, inbox.page(f"Inbox: {team}", body, team, "inbox"))

        async def post(self, request: Any) -> Any:
            """The inbox list's quick fix: take one of an item's suggestions."""
            form = await request.post()
            try:
                team = desk.team_of(request)
                action = form.get("action", "resolve")
                sets = [s for s in (form.get("set") or "").splitlines() if s.strip()]
                choose = form.get("choose") if action == "resolve" else None
                await desk.act_anywhere(desk.token_of(request), team, form["exception_id"], action, form["customer"],
                                        sets, choose, form.get("note", ""), user_of(request))
                msg = f"{action} of {form['exception_id'][:12]} accepted; it closes when the replay succeeds"
            except Refused as exc:
                msg = f"refused ({exc.status}): {exc}"
            except KeyError as exc:
                msg = f"refused: the form lacks {exc}"
            return self.text("", status=303, headers=back("/inbox", msg=msg))

    @app.page("/inbox/item/{exception_id}")
    class InboxItem(View):
        async def get(self, request: Any, exception_id: str) -> Any:
            try:
                team = desk.team_of(request)
            except Refused:
                return _html(self, inbox.page("Concord inbox", inbox.LOGIN), status=401)
            token = desk.token_of(request)
            try:
                rec = await desk.record_anywhere(team, exception_id, token)
                status = await desk.status_anywhere(rec.get("customer_key") or request.query.get("customer", ""),
                                                    token)
            except Refused as exc:
                return _html(self, inbox.page("Not found", f"<p class=err id=error>{exc}</p><p><a href=/inbox>Inbox</a>"
                                            "</p>", team), status=exc.status)
            original = None
            if rec.get("original"):
                try:
                    original = desk.pipeline.codec.decode(bytes.fromhex(rec["original"]["value"]))[1]
                except (ConcordError, ValueError):
                    original = None
            at_risk = money(amount_at_risk(rec, status), currency_of(rec, status))
            body = inbox.render_item(team, rec, int(time.time() * 1000), chain(status, links), at_risk, links,
                                     status, original, inbox.runbook_text(rec["reason_code"]),
                                     request.query.get("msg", ""))
            return _html(self, inbox.page(f"{rec['reason_code']}: {rec['entity_id']}", body, team, "inbox"))

    @app.page("/inbox/item/{exception_id}/act")
    class InboxItemAct(View):
        async def post(self, request: Any, exception_id: str) -> Any:
            form = await request.post()
            here = f"/inbox/item/{quote(exception_id, safe='')}?" + urlencode(
                {"customer": request.query.get("customer", "")})
            try:
                team = desk.team_of(request)
                action, token = form.get("action", ""), desk.token_of(request)
                if action == "assign":
                    await desk.assign_anywhere(token, team, exception_id, form.get("assignee", ""), user_of(request))
                    msg = f"assigned to {form.get('assignee') or 'nobody'}"
                else:
                    sets = [s for s in (form.get("set") or "").splitlines() if s.strip()]
                    choose = form.get("choose") if action == "resolve" and not sets else None
                    await desk.act_anywhere(token, team, exception_id, action, request.query.get("customer", ""),
                                            sets, choose, form.get("note", ""), user_of(request))
                    msg = f"{action} accepted" + ("; it closes when the replay succeeds" if action == "resolve" else "")
            except Refused as exc:
                msg = f"refused ({exc.status}): {exc}"
            return self.text("", status=303, headers=back(here, msg=msg))

    @app.page("/inbox/bulk")
    class InboxBulk(View):
        async def post(self, request: Any) -> Any:
            form = await request.post()
            try:
                team = desk.team_of(request)
            except Refused:
                return _html(self, inbox.page("Concord inbox", inbox.LOGIN), status=401)
            try:
                f = inbox.Filters.from_query(form)
                op = form.get("op", "")
                if op not in BULK_OPS:
                    raise inbox.BadFilter(f"op: one of {', '.join(BULK_OPS)}")
                sets = (form.get("set") or "").strip()
                note = (form.get("note") or "").strip()
                if op == "resolve" and not sets:
                    raise inbox.BadFilter("resolve needs a field=value patch for every exception")
                if op == "discard" and not note:
                    raise inbox.BadFilter("discarding needs a reason")
            except inbox.BadFilter as exc:
                return self.text("", status=303, headers=back("/inbox", msg=f"bulk refused: {exc}"))
            records = await desk.gathered(request, desk.queue(team, None, f.state or None),
                                          {"state": f.state} if f.state else {})
            amount, _ = pricing()
            matching = inbox.select(records, team, f, int(time.time() * 1000), amount)
            title = f"Bulk {op}: {team}"
            if form.get("confirm") != "1":
                body = inbox.render_bulk_dry_run(f, op, sets, note, matching)
                return _html(self, inbox.page(title, body, team, "inbox"))
            ids = [r["exception_id"] for r in matching]
            if inbox.digest(ids) != form.get("digest") or len(matching) > inbox.BULK_MAX:
                body = ("<p class=err id=error>The matching set changed since the dry run "
                        f"({form.get('expect')} then, {len(ids)} now): nothing was done. Look again:</p>"
                        + inbox.render_bulk_dry_run(f, op, sets, note, matching))
                return _html(self, inbox.page(title, body, team, "inbox"), status=409)
            accepted, refusals = [], []
            token, user = desk.token_of(request), user_of(request)
            for r in matching:
                action = "discard" if op == "discard" else "resolve"
                choose = "1" if op == "replay" and r.get("suggestions") else None
                patch = [sets] if op == "resolve" else []
                try:
                    await desk.act_anywhere(token, team, r["exception_id"], action, r.get("customer_key", ""), patch,
                                            choose, note, user)
                    accepted.append(r["exception_id"])
                except Refused as exc:
                    refusals.append((r["exception_id"], f"{exc.status}: {exc}"))
            body = inbox.render_bulk_result(op, accepted, refusals, "/inbox?" + urlencode(f.query(page=1)))
            return _html(self, inbox.page(title, body, team, "inbox"))

    @app.page("/inbox/reconciliation")
    class Reconciliation(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
                records = await everyone(request)
            except Refused as exc:
                if exc.status == 401:
                    return _html(self, inbox.page("Concord inbox", inbox.LOGIN), status=401)
                return _html(self, inbox.page("Reconciliation", f"<p class=err>{exc}</p>"), status=exc.status)
            amount, _ = pricing()
            summary = reconcile.summarize(records, int(time.time() * 1000), amount,
                                          reconcile.Counters.from_samples(_samples()))
            note = "Amounts are summed as recorded, whatever their currency; the KPI counters are this worker's."
            return _html(self, inbox.page("Reconciliation", reconcile.render_reconciliation(summary, note), team,
                                        "reconciliation"))

    async def build_checklist(request: Any) -> checks.Checklist:
        from concord.domain.routing import load_routing

        now = int(time.time() * 1000)
        try:
            routing, error = load_routing(), None
        except ConcordError as exc:
            routing, error = None, str(exc)
        runs = {labels.get("outcome"): v for name, labels, v in _samples() if name == "concord_canary_runs_total"}
        canary_obj = getattr(app, "canary", None)
        last = getattr(canary_obj, "last", None)
        canary = checks.Canary(canary_obj is not None, runs.get("succeeded", 0), runs.get("failed", 0),
                               *(last if last else (None, None)))
        bootstrap = ",".join(f"{u.host}:{u.port}" for u in app.conf.broker)
        try:
            dead = await asyncio.to_thread(checks.read_deadletters, bootstrap, now - checks.WEEK_MS)
        except Exception:  # noqa: BLE001 - the checklist says it could not read them, and still answers
            dead = None
        return checks.build(routing, await everyone(request), canary, dead, now, config_error=error)

    @app.page("/inbox/checklist")
    class ChecklistPage(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
                result = await build_checklist(request)
            except Refused as exc:
                if exc.status == 401:
                    return _html(self, inbox.page("Concord inbox", inbox.LOGIN), status=401)
                return _html(self, inbox.page("Checklist", f"<p class=err>{exc}</p>"), status=exc.status)
            return _html(self, inbox.page("Monday-morning checklist", checks.render_html(result), team, "checklist"))

    @app.page("/checklist")
    class ChecklistJson(View):
        async def get(self, request: Any) -> Any:
            try:
                desk.team_of(request)
                return self.json((await build_checklist(request)).to_dict())
            except Refused as exc:
                return refused(self, exc)

    @app.page("/inbox/static/{name}")
    class Static(View):
        async def get(self, request: Any, name: str) -> Any:
            path = STATIC / name
            if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
                return self.text("not found", status=404)
            return self.bytes(path.read_bytes(), content_type=STATIC_TYPES[path.suffix],
                              headers={"Cache-Control": "max-age=300"})

    @app.page("/inbox/login")
    class InboxLogin(View):
        async def post(self, request: Any) -> Any:
            form = await request.post()
            token = form.get("token", "")
            if not any(hmac.compare_digest(t.encode(), token.encode()) for t in desk.credentials):
                return _html(self, inbox.page("Concord inbox", "<p class=err id=error>Unknown credential.</p>"
                                            + inbox.LOGIN), status=401)
            user = quote((form.get("user") or "").strip()[:80], safe="")
            cookie = "HttpOnly; SameSite=Strict; Path=/"
            return self.text("", status=303, headers=_cookies("/inbox", [f"concord_token={token}; {cookie}",
                                                                          f"concord_user={user}; {cookie}"]))

    @app.page("/inbox/logout")
    class InboxLogout(View):
        async def post(self, request: Any) -> Any:
            gone = "Max-Age=0; HttpOnly; SameSite=Strict; Path=/"
            return self.text("", status=303, headers=_cookies("/inbox", [f"concord_token=; {gone}",
                                                                          f"concord_user=; {gone}"]))


def _cookies(location: str, cookies: list[str]) -> Any:
    from multidict import CIMultiDict

    return CIMultiDict([("Location", location), *(("Set-Cookie", c) for c in cookies)])

