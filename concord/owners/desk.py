"""The owners' side of exceptions on a worker: an HTTP API and an inbox page, both per team.

Every request carries a team credential (``Authorization: Bearer <token>``, or the inbox's cookie). A team
sees and acts on its own queue only. Actions are checked here against the customer's status — a bad patch
is refused at once and changes nothing — then published to ``actions.exceptions``, where the customer's
stage-two agent applies them in order with the customer's events and replays the rules.
"""

from __future__ import annotations

import hmac
import html
import json
import time
import uuid
from typing import Any

from concord.contracts.topics import exceptions_topic
from concord.domain import rules
from concord.domain.flow_config import FlowConfig
from concord.domain.guard import guard_key
from concord.exceptions import ValidationError
from concord.runtime.pipeline import Out, customer_key

OPEN_STATES = ("open", "acknowledged", "escalated")
ACTIONS = ("acknowledge", "resolve", "discard")


class Refused(Exception):
    """A request the desk turns down: HTTP status and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def table_record(rec: dict[str, Any]) -> dict[str, Any]:
    """An exception record as JSON for the exception_to_record table (bytes as hex)."""
    out = dict(rec)
    orig = rec.get("original")
    if orig:
        out["original"] = {"topic": orig["topic"], "partition": orig["partition"], "offset": orig["offset"],
                           "key": (orig.get("key") or b"").hex(), "value": orig["value"].hex()}
    out["customer_key"] = customer_key({"customer_id": rec.get("customer_id"), "entity_type": rec["entity_type"],
                                        "entity_id": rec["entity_id"]}).decode()
    return out


def wire_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A table record back into the shape of schemas/exception.avsc."""
    out = {k: v for k, v in rec.items() if k != "customer_key"}
    orig = rec.get("original")
    if orig:
        out["original"] = {"topic": orig["topic"], "partition": orig["partition"], "offset": orig["offset"],
                           "key": bytes.fromhex(orig["key"]) or None, "value": bytes.fromhex(orig["value"])}
    return out


def newer(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` should replace ``old`` (records from several queues may arrive out of order)."""
    if old is None:
        return True
    if new["opened_at"] != old["opened_at"]:
        return new["opened_at"] > old["opened_at"]  # raised again after it closed
    if old["state"] in ("resolved", "discarded") and new["state"] in OPEN_STATES:
        return new["updated_at"] > old["updated_at"]
    return new["updated_at"] >= old["updated_at"]


class Desk:
    """The logic behind the API and the inbox, independent of HTTP."""

    def __init__(self, app: Any, credentials: dict[str, str], cfg: FlowConfig, statuses: Any,
                 exceptions: Any, actions: Any, controls: Any, pipeline: Any) -> None:
        self.app, self.credentials, self.cfg = app, credentials, cfg
        self.statuses, self.exceptions, self.actions, self.controls = statuses, exceptions, actions, controls
        self.pipeline = pipeline
        self.publish: Any = None  # async (list of Out) -> None: the worker's producer, set by the worker

    # ---- who is asking -----------------------------------------------------------------------
    def team_of(self, request: Any) -> str:
        """The team whose credential the request carries; 401 without a valid one."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.startswith("Bearer ") else request.cookies.get("concord_token", "")
        if not self.credentials:
            raise Refused(401, "no owner credentials are configured on this worker (CONCORD_OWNER_TOKENS)")
        if not token:
            raise Refused(401, "missing credential: send Authorization: Bearer <team token>")
        for known, team in self.credentials.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return team
        raise Refused(401, "unknown credential")

    # ---- reading -------------------------------------------------------------------------------
    def queue(self, team: str, reason: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """The team's exceptions held by this worker, soonest SLA first."""
        recs = [r for r in self.exceptions.values() if r and r["owner"] == team
                and (reason is None or r["reason_code"] == reason)
                and (r["state"] == state if state else r["state"] in OPEN_STATES)]
        return sorted(recs, key=lambda r: (r["sla_deadline"], r["exception_id"]))

    def one(self, team: str, exception_id: str) -> dict[str, Any]:
        """One exception record, if it is the team's."""
        rec = self.exceptions.get(exception_id.encode())
        if rec is None:
            raise Refused(404, f"no exception {exception_id!r}")
        if team not in (rec["owner"], rec.get("backup_owner")):
            raise Refused(403, f"exception {exception_id} belongs to {rec['owner']}, not {team}")
        return rec

    async def from_peers(self, request: Any) -> list[dict[str, Any]]:
        """The same query answered by every other worker holding part of the exception table."""
        own = str(self.app.conf.canonical_url).rstrip("/")
        peers = sorted(str(h).rstrip("/") for h in self.app.router.table_metadata(self.exceptions.name))
        out: list[dict[str, Any]] = []
        query = {**request.query, "local": "1"}
        for peer in peers:
            if peer == own:
                continue
            try:
                async with self.app.http_client.get(f"{peer}/exceptions", params=query, headers={
                        "Authorization": request.headers.get("Authorization", "")}, timeout=10) as resp:
                    if resp.status != 200:
                        raise Refused(502, f"worker {peer} answered {resp.status}: {await resp.text()}")
                    out += await resp.json()
            except OSError as exc:
                raise Refused(503, f"worker {peer} holds part of the queue and cannot be reached: {exc}") from None
        return out

    # ---- acting --------------------------------------------------------------------------------
    async def act(self, team: str, exception_id: str, action: str, ckey: str, sets: list[str], choose: str | None,
                  note: str, user: str | None) -> dict[str, Any]:
        """Check an owner's action against the customer's status, then publish it; refuse with a reason."""
        if action not in ACTIONS:
            raise Refused(400, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        by = f"{team}:{user}" if user else team
        status = self.statuses.get(ckey.encode())
        entry = (status or {}).get("exceptions", {}).get(exception_id)
        if entry is None:
            return await self._act_elsewhere(team, exception_id, action, status, by, note)
        if team not in (entry.get("owner"), entry.get("backup")):
            raise Refused(403, f"exception {exception_id} belongs to {entry.get('owner')}, not {team}")
        patch = self._patch(status, exception_id, sets, choose) if action == "resolve" else {}
        if action == "discard" and not note.strip():
            raise Refused(400, "discarding needs a reason: --why TEXT")
        msg = {"action_id": uuid.uuid4().hex, "exception_id": exception_id, "customer_key": ckey, "action": action,
               "patch": patch, "by": by, "note": note, "at": int(time.time() * 1000)}
        try:
            rules.act(status, msg, self.cfg, msg["at"])  # a dry run: refuse now what the replay would refuse
        except ValidationError as exc:
            raise Refused(422, str(exc)) from None
        await self.publish([Out(self.actions, ckey.encode(), self.pipeline.codec.encode("action", msg))])
        return {"accepted": True, "action_id": msg["action_id"], "exception_id": exception_id, "action": action,
                "patch": patch, "by": by}

    def _patch(self, status: dict[str, Any], exception_id: str, sets: list[str], choose: str | None) -> dict[str, str]:
        patch: dict[str, str] = {}
        if choose:
            draft = next((d for d in rules.warranted(status, self.cfg)[1] if d["exception_id"] == exception_id), None)
            options = (draft or {}).get("suggestions", [])
            try:
                pick = options[int(choose) - 1]
            except (ValueError, IndexError):
                raise Refused(400, f"--choose {choose}: there are {len(options)} suggestion(s)") from None
            patch[pick["field"]] = str(pick["value"])
        for item in sets:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise Refused(400, f"--set {item!r}: expected field=value")
            patch[name.strip()] = value.strip()
        if not patch:
            raise Refused(400, "a resolution needs --set field=value or --choose N")
        return patch

    async def _act_elsewhere(self, team: str, exception_id: str, action: str, status: dict[str, Any] | None,
                             by: str, note: str) -> dict[str, Any]:
        """Exceptions outside the status table (sequence gaps, rejected commands), or ones already closed."""
        if status and exception_id in status.get("discarded", {}):
            raise Refused(409, f"exception {exception_id} was discarded; it cannot be {action}d")
        rec = self.exceptions.get(exception_id.encode())
        if rec is None:
            raise Refused(404, f"no exception {exception_id!r}")
        if team not in (rec["owner"], rec.get("backup_owner")):
            raise Refused(403, f"exception {exception_id} belongs to {rec['owner']}, not {team}")
        if rec["state"] not in OPEN_STATES:
            raise Refused(409, f"exception {exception_id} is already {rec['state']}")
        if action == "discard" and not note.strip():
            raise Refused(400, "discarding needs a reason: --why TEXT")
        now = int(time.time() * 1000)
        reason, patch = rec["reason_code"], {}
        if action == "resolve" and reason == "command_rejected" and rec.get("original"):
            orig = rec["original"]  # the target's data was fixed: send the same command (same id) again
            key = bytes.fromhex(orig["key"]) or None  # an unkeyed command stays unkeyed
            await self.publish([Out(orig["topic"], key, bytes.fromhex(orig["value"]))])  # type: ignore[arg-type]
            patch, note = {"action": "resend_command"}, note or "the command was sent again"
        elif action in ("resolve", "discard") and reason == "sequence_gap":
            gkey = guard_key(rec["source_system"], rec["entity_type"], rec["entity_id"])
            control = {"action": "release_gap", "guard_key": gkey, "actor": by, "at": now}
            await self.publish([Out(self.controls, rec["entity_id"].encode(),
                                    self.pipeline.codec.encode("control", control))])
            patch, note = {"action": "release_gap"}, note or "parked events released without the missing ones"
        elif action == "resolve":
            raise Refused(409, f"a {reason} exception outside a customer's status can be acknowledged or discarded "
                               "once fixed in the owning system, not resolved with a patch")
        state = {"acknowledge": "acknowledged", "resolve": "resolved", "discard": "discarded"}[action]
        base = wire_record(rec)
        if rec["state"] == "escalated" and rec.get("backup_owner"):  # back to its owner's queue, as it closes
            base.update(owner=rec["backup_owner"], backup_owner=rec["owner"])
        done = {**base, "state": state, "updated_at": now,
                "resolution": {"by": by, "at": now, "patch": patch, "note": note}}
        outs = self.pipeline.closing(done, now, by) if state != "acknowledged" else [
            Out(exceptions_topic(done["owner"]), exception_id.encode(), self.pipeline.codec.encode("exception", done))]
        await self.publish(outs)
        return {"accepted": True, "exception_id": exception_id, "action": action, "by": by}


_LOGIN = """<form method=post action=/inbox/login><label>Team credential
<input type=password name=token id=token autocomplete=off></label> <button id=login>Sign in</button></form>"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font:14px system-ui;margin:2em}li{border:1px solid #ccc;margin:.5em 0;padding:.6em;list-style:none}"
            ".late{color:#b00}.err{color:#b00}small{color:#555}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _inbox(team: str, queue: list[dict[str, Any]], query: Any) -> str:
    now = int(time.time() * 1000)
    parts = []
    if query.get("msg"):
        parts.append(f"<p id=msg>{html.escape(query['msg'])}</p>")
    parts.append(f"<p>{len(queue)} open, soonest SLA first.</p><ul id=queue>")
    for r in queue:
        left = (r["sla_deadline"] - now) / 60_000
        when = f"{left:.0f} min left" if left >= 0 else f"<span class=late>{-left:.0f} min past SLA</span>"
        eid = html.escape(r["exception_id"])
        options = "".join(
            f"<label><input type=radio name=choose value={i}> {html.escape(s['field'])} = "
            f"<b>{html.escape(s['value'])}</b> <small>{html.escape(s.get('label', ''))}</small></label><br>"
            for i, s in enumerate(r.get("suggestions") or [], 1))
        hidden = (f"<input type=hidden name=exception_id value={eid}>"
                  f"<input type=hidden name=customer value=\"{html.escape(r['customer_key'])}\">")
        parts.append(
            f"<li id=\"x-{eid}\" data-reason={html.escape(r['reason_code'])}><b>{html.escape(r['reason_code'])}</b> "
            f"{html.escape(r['entity_type'])} {html.escape(r['entity_id'])} · customer "
            f"{html.escape(r.get('customer_id') or '?')} · {r['state']} · {when}"
            f"<p>{html.escape(r['message'])}</p>"
            f"<form method=post action=/inbox class=resolve>{hidden}{options}"
            f"<label>or set field=value <textarea name=set rows=1 cols=40></textarea></label> "
            f"<button name=action value=resolve class=resolve-btn>Resolve</button></form>"
            f"<form method=post action=/inbox class=discard>{hidden}<input name=note placeholder=why> "
            f"<button name=action value=discard>Discard</button></form></li>")
    parts.append("</ul>")
    return "".join(parts)


def render_record(rec: dict[str, Any]) -> str:
    """One exception as readable lines (for the CLI)."""
    lines = [f"{rec['exception_id']}  {rec['reason_code']}  {rec['state']}  owner {rec['owner']}"
             f" (backup {rec.get('backup_owner') or '-'})  severity {rec['severity']}",
             f"  {rec['entity_type']} {rec['entity_id']}  customer {rec.get('customer_id') or '?'}"
             f"  trace {rec['trace_id']}",
             f"  opened {_ts(rec['opened_at'])}  SLA {_ts(rec['sla_deadline'])}"
             f"{'  blocks billing' if rec.get('blocks_billing') else ''}",
             f"  {rec['message']}"]
    for i, s in enumerate(rec.get("suggestions") or [], 1):
        lines.append(f"  [{i}] {s['field']} = {s['value']}  {s.get('label', '')} ({s.get('score', 0):.2f})")
    if rec.get("resolution"):
        r = rec["resolution"]
        lines.append(f"  {rec['state']} by {r['by']} at {_ts(r['at'])}: {json.dumps(r.get('patch') or {})} "
                     f"{r.get('note') or ''}".rstrip())
    return "\n".join(lines)


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


