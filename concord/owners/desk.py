"""The owners' side of exceptions on a worker: the logic behind the HTTP API and the workspace pages.

Every request carries a team credential (``Authorization: Bearer <token>``, or the inbox's cookie). A team
sees and acts on its own queue only; the cross-team views get summaries without an item's details. Actions
are checked here against the customer's status — a bad patch is refused at once and changes nothing — then
published to the deployment's ``actions.exceptions``, where the customer's stage-two agent applies them in order
with the customer's events and replays the rules.
"""

from __future__ import annotations

import hmac
import json
import time
import urllib.parse
import uuid
from typing import Any

from concord.domain import rules
from concord.domain.flow_config import FlowConfig
from concord.domain.guard import guard_key
from concord.exceptions import ValidationError
from concord.runtime.pipeline import Out, customer_key

OPEN_STATES = ("open", "acknowledged", "escalated")
CLOSED_STATES = ("resolved", "discarded")
SUMMARY_FIELDS = ("exception_id", "reason_code", "state", "owner", "backup_owner", "severity", "opened_at",
                  "sla_deadline", "updated_at", "entity_type", "entity_id", "customer_id", "customer_key")
ACTIONS = ("acknowledge", "resolve", "discard")



class Refused(Exception):
    """A request the desk turns down: HTTP status and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


HISTORY_MAX = 50  # an item reopened many times keeps its latest steps


def table_record(rec: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """An exception record as JSON for the exception_to_record table (bytes as hex), with its history so far."""
    out = dict(rec)
    orig = rec.get("original")
    if orig:
        out["original"] = {"topic": orig["topic"], "partition": orig["partition"], "offset": orig["offset"],
                           "key": (orig.get("key") or b"").hex(), "value": orig["value"].hex()}
    out["customer_key"] = customer_key({"customer_id": rec.get("customer_id"), "entity_type": rec["entity_type"],
                                        "entity_id": rec["entity_id"]}).decode()
    if old and old["owner"] != rec["owner"]:  # escalated or handed back: the new team assigns its own people
        out["assignee"], out["assigned_by"] = None, None
    elif rec.get("assignee") is None and old:  # records from the rules do not know who it was assigned to
        out["assignee"], out["assigned_by"] = old.get("assignee"), old.get("assigned_by")
    history = list((old or {}).get("history") or [])
    if old is None or old["opened_at"] != rec["opened_at"]:
        history.append({"at": rec["opened_at"], "step": "opened", "owner": rec["owner"], "by": None})
    step = _step(old, out)
    if step:
        who = (rec.get("resolution") or {}).get("by") if step in ("resolved", "discarded", "acknowledged") else None
        history.append({"at": rec["updated_at"], "step": step, "owner": rec["owner"],
                        "by": who or out.get("assigned_by"), "assignee": out.get("assignee")})
    out["history"] = history[-HISTORY_MAX:]
    return out


def _step(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """What changed between two versions of an exception, as a history step (None: nothing to record)."""
    if old is None or old["opened_at"] != new["opened_at"]:
        return str(new["state"]) if new["state"] != "open" else None
    if old["state"] != new["state"]:
        return str(new["state"])
    if (new.get("assignee") or "") != (old.get("assignee") or ""):
        return "assigned" if new.get("assignee") else "unassigned"
    return None


def wire_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A table record back into the shape of schemas/exception.avsc."""
    out = {k: v for k, v in rec.items() if k not in _TABLE_ONLY}
    orig = rec.get("original")
    if orig:
        out["original"] = {"topic": orig["topic"], "partition": orig["partition"], "offset": orig["offset"],
                           "key": bytes.fromhex(orig["key"]) or None, "value": bytes.fromhex(orig["value"])}
    return out


_TABLE_ONLY = ("customer_key", "history")


def newer(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` should replace ``old`` (records from several queues may arrive out of order)."""
    if old is None:
        return True
    if new["opened_at"] != old["opened_at"]:
        return new["opened_at"] > old["opened_at"]  # raised again after it closed
    if (old["state"] in CLOSED_STATES) != (new["state"] in CLOSED_STATES):
        return new["state"] in CLOSED_STATES  # closing is final for this opening, even against an escalation the SLA
        # check decided later from a view of the table from before the close
    return new["updated_at"] >= old["updated_at"]


def stale_escalation(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` escalates an opening ``old`` already closed (the SLA check read the table before it did)."""
    return (old is not None and old["state"] in CLOSED_STATES and new["state"] == "escalated"
            and new["opened_at"] == old["opened_at"])


class Desk:
    """The logic behind the API and the inbox, independent of HTTP."""

    def __init__(self, app: Any, credentials: dict[str, str], cfg: FlowConfig, statuses: Any,
                 exceptions: Any, pipeline: Any) -> None:
        self.app, self.credentials, self.cfg = app, credentials, cfg
        self.statuses, self.exceptions = statuses, exceptions
        self.pipeline = pipeline
        self.names = pipeline.names  # the deployment's topics the desk writes: actions, controls, exceptions
        self.publish: Any = None  # async (list of Out) -> None: the worker's producer, set by the worker

    # ---- who is asking -----------------------------------------------------------------------
    def team_of(self, request: Any) -> str:
        """The team whose credential the request carries; 401 without a valid one."""
        token = self.token_of(request)
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

    def token_of(self, request: Any) -> str:
        """The credential a request carries (header or the inbox's cookie), as sent on to other workers."""
        header = request.headers.get("Authorization", "")
        return header[7:].strip() if header.startswith("Bearer ") else request.cookies.get("concord_token", "")

    async def from_peers(self, request: Any, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The same query answered by every other worker holding part of the exception table."""
        own = str(self.app.conf.canonical_url).rstrip("/")
        peers = sorted(str(h).rstrip("/") for h in self.app.router.table_metadata(self.exceptions.name))
        out: list[dict[str, Any]] = []
        query = {**(request.query if query is None else query), "local": "1"}
        for peer in peers:
            if peer == own:
                continue
            try:
                async with self.app.http_client.get(f"{peer}/exceptions", params=query, headers={
                        "Authorization": f"Bearer {self.token_of(request)}"}, timeout=10) as resp:
                    if resp.status != 200:
                        raise Refused(502, f"worker {peer} answered {resp.status}: {await resp.text()}")
                    out += await resp.json()
            except OSError as exc:
                raise Refused(503, f"worker {peer} holds part of the queue and cannot be reached: {exc}") from None
        return out

    def everything(self) -> list[dict[str, Any]]:
        """Every exception record this worker holds, of every team and in every state, as summaries.

        Any team may see these (they feed the cross-team reconciliation and checklist): what an item says and
        suggests stays with its own team. The amount at risk is worked out here, where the status may be.
        """
        from concord.owners.picture import amount_at_risk, currency_of

        out = []
        for r in self.exceptions.values():
            if r:
                status = self.statuses.get(r["customer_key"].encode()) if r.get("customer_key") else None
                out.append({**{k: r.get(k) for k in SUMMARY_FIELDS}, "amount_at_risk_cents": amount_at_risk(r, status),
                            "currency": currency_of(r, status),
                            "resolution": {k: (r.get("resolution") or {}).get(k) for k in ("by", "at")}})
        return out

    async def gathered(self, request: Any, local: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        """``local`` records plus the same query's answer from the other workers, latest version of each."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in local + await self.from_peers(request, query):  # a standby copy may also be listed
            if rec["exception_id"] not in latest or newer(latest[rec["exception_id"]], rec):
                latest[rec["exception_id"]] = rec
        return sorted(latest.values(), key=lambda r: (r["sla_deadline"], r["exception_id"]))

    async def assign(self, team: str, exception_id: str, person: str, user: str | None) -> dict[str, Any]:
        """Assign one of the team's open exceptions to a person on it (an empty name unassigns)."""
        rec = self.one(team, exception_id)
        if rec["state"] not in OPEN_STATES:
            raise Refused(409, f"exception {exception_id} is already {rec['state']}")
        person = person.strip()
        if len(person) > 80 or any(not (c.isalnum() or c in " .-_@'") for c in person):
            raise Refused(400, "a person's name: up to 80 letters, digits, spaces and . - _ @ '")
        by = f"{team}:{user}" if user else team
        now = int(time.time() * 1000)
        done = {**wire_record(rec), "assignee": person, "assigned_by": by, "updated_at": max(now, rec["updated_at"])}
        await self.publish([Out(self.names.exceptions(done["owner"]), exception_id.encode(),
                                self.pipeline.codec.encode("exception", done))])
        return {"accepted": True, "exception_id": exception_id, "action": "assign", "assignee": person, "by": by}

    def _elsewhere(self, table: Any, key: bytes) -> str | None:
        """The address of the worker holding ``key`` of ``table``, or None when it is this one (or unknown)."""
        try:
            dest = str(self.app.router.key_store(table.name, key)).rstrip("/")
        except KeyError:  # no assignment yet: this worker is all there is
            return None
        return None if dest == str(self.app.conf.canonical_url).rstrip("/") else dest

    async def _call(self, method: str, url: str, token: str, params: list[tuple[str, str]] | None = None) -> Any:
        async with self.app.http_client.request(method, url, params=params or [], timeout=15,
                                                headers={"Authorization": f"Bearer {token}"}) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = {"error": text}
            if resp.status >= 400:
                raise Refused(resp.status, body.get("error", text) if isinstance(body, dict) else text)
            return body

    async def status_anywhere(self, ckey: str, token: str) -> dict[str, Any] | None:
        """A customer's status from whichever worker holds it (None when nothing is known of the customer)."""
        where = self._elsewhere(self.statuses, ckey.encode())
        if where is None:
            return self.statuses.get(ckey.encode())
        try:
            return await self._call("GET", f"{where}/customers/{urllib.parse.quote(ckey, safe='')}", token)
        except Refused as exc:
            if exc.status == 404:
                return None
            raise

    async def record_anywhere(self, team: str, exception_id: str, token: str) -> dict[str, Any]:
        """One of the team's exception records, from whichever worker holds it."""
        where = self._elsewhere(self.exceptions, exception_id.encode())
        if where is None:
            return self.one(team, exception_id)
        return await self._call("GET", f"{where}/exceptions/{urllib.parse.quote(exception_id, safe='')}", token)

    async def act_anywhere(self, token: str, team: str, exception_id: str, action: str, ckey: str, sets: list[str],
                           choose: str | None, note: str, user: str | None) -> dict[str, Any]:
        """act(), on the worker holding the customer's status (a form's fields travel as the API's query)."""
        where = self._elsewhere(self.statuses, ckey.encode())
        if where is None:
            return await self.act(team, exception_id, action, ckey, sets, choose, note, user)
        params = [("customer", ckey), ("note", note)] + [("set", s) for s in sets]
        params += [("choose", choose)] if choose else []
        params += [("user", user)] if user else []
        return await self._call("POST", f"{where}/exceptions/{urllib.parse.quote(exception_id, safe='')}/{action}",
                                token, params)

    async def assign_anywhere(self, token: str, team: str, exception_id: str, person: str,
                              user: str | None) -> dict[str, Any]:
        """assign(), on the worker holding the exception's record."""
        where = self._elsewhere(self.exceptions, exception_id.encode())
        if where is None:
            return await self.assign(team, exception_id, person, user)
        params = [("assignee", person)] + ([("user", user)] if user else [])
        return await self._call("POST", f"{where}/assignments/{urllib.parse.quote(exception_id, safe='')}", token,
                                params)

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
        await self.publish([Out(self.names.exception_actions, ckey.encode(),
                                self.pipeline.codec.encode("action", msg))])
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
            await self.publish([Out(self.names.guard_controls, rec["entity_id"].encode(),
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
            Out(self.names.exceptions(done["owner"]), exception_id.encode(),
                self.pipeline.codec.encode("exception", done))]
        await self.publish(outs)
        return {"accepted": True, "exception_id": exception_id, "action": action, "by": by}


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


