"""The owners' HTTP API (/exceptions...) and inbox (/inbox) as faust web views over the Desk."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlencode

import faust
from faust.web import View

from concord.owners.desk import _LOGIN, Desk, Refused, _inbox, _page, newer


def register_views(app: faust.App, desk: Desk) -> None:
    """The HTTP API (/exceptions...) and the inbox (/inbox) on the worker's web server."""

    def refused(view: View, exc: Refused) -> Any:
        return view.json({"error": str(exc)}, status=exc.status)

    @app.page("/exceptions")
    class ExceptionList(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
                owner = request.query.get("owner")
                if owner and owner != team:
                    raise Refused(403, f"{team} may list its own queue only, not {owner}'s")
                queue = desk.queue(team, request.query.get("reason"), request.query.get("state"))
                if not request.query.get("local"):  # the table is spread over the workers: ask the others too
                    latest: dict[str, dict[str, Any]] = {}
                    for rec in queue + await desk.from_peers(request):  # a standby copy may also be listed
                        if rec["exception_id"] not in latest or newer(latest[rec["exception_id"]], rec):
                            latest[rec["exception_id"]] = rec
                    queue = sorted(latest.values(), key=lambda r: (r["sla_deadline"], r["exception_id"]))
                return self.json(queue)
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

    @app.page("/inbox")
    class Inbox(View):
        async def get(self, request: Any) -> Any:
            try:
                team = desk.team_of(request)
            except Refused:
                return self.html(_page("Concord inbox", _LOGIN), status=200)
            return self.html(_page(f"Concord inbox: {team}", _inbox(team, desk.queue(team), request.query)))

        async def post(self, request: Any) -> Any:
            form = await request.post()
            try:
                team = desk.team_of(request)
                action = form.get("action", "resolve")
                sets = [s for s in (form.get("set") or "").splitlines() if s.strip()]
                choose = form.get("choose") if action == "resolve" else None
                await desk.act(team, form["exception_id"], action, form["customer"], sets, choose,
                               form.get("note", ""), form.get("user") or None)
                msg = f"{action} of {form['exception_id'][:12]} accepted; it closes when the replay succeeds"
            except Refused as exc:
                msg = f"refused ({exc.status}): {exc}"
            except KeyError as exc:
                msg = f"refused: the form lacks {exc}"
            return self.text("", status=303, headers={"Location": "/inbox?" + urlencode({"msg": msg})})

    @app.page("/inbox/login")
    class InboxLogin(View):
        async def post(self, request: Any) -> Any:
            form = await request.post()
            token = form.get("token", "")
            if not any(hmac.compare_digest(t.encode(), token.encode()) for t in desk.credentials):
                return self.html(_page("Concord inbox", "<p class=err>Unknown credential.</p>" + _LOGIN), status=401)
            return self.text("", status=303, headers={
                "Location": "/inbox", "Set-Cookie": f"concord_token={token}; HttpOnly; SameSite=Strict; Path=/"})
