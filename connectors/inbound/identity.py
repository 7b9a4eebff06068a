"""Cross-reference of native ids to one Concord customer id, learnt from the links events carry.

The Concord customer id is the CRM's id of the account (the CRM owns customers). Links come from the
events themselves: a CRM account's billing id and dispatch id, a Stripe customer's
``metadata.concord_customer_id``, a job's account reference once the account is known. An event whose
customer cannot be resolved keeps ``customer_id`` null and carries ranked candidate matches (name,
e-mail, domain similarity) for a person to confirm: a candidate is never used as the answer.

Persisted as JSON::

    {"links": {"billing:cus_123": "001XX", "dispatch:client-9": "001XX"},
     "profiles": {"001XX": {"name": "Acme Ltd", "email": "ap@acme.com", "domain": "acme.com"}}}
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from connectors.inbound.common import domain_of

DEFAULT_PATH = ".concord/identity.json"
_SUFFIXES = re.compile(r"\b(inc|incorporated|llc|ltd|limited|gmbh|corp|corporation|co|company|plc|sa|bv)\b\.?")


def _norm_name(name: str) -> str:
    n = _SUFFIXES.sub("", name.lower())
    return re.sub(r"[^a-z0-9]+", " ", n).strip()


class IdentityMap:
    """Native ids → Concord customer ids, plus what is known of each customer for candidate ranking."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.links: dict[str, str] = {}
        self.profiles: dict[str, dict[str, str | None]] = {}
        if self.path and self.path.exists():
            doc = json.loads(self.path.read_text() or "{}")
            self.links = dict(doc.get("links", {}))
            self.profiles = {k: dict(v) for k, v in doc.get("profiles", {}).items()}
        self._dirty = False

    def resolve(self, system: str, native_id: str) -> str | None:
        """The customer id linked to ``system``'s id ``native_id``, if a link was learnt."""
        return self.links.get(f"{system}:{native_id}")

    def link(self, system: str, native_id: str | None, customer_id: str | None) -> None:
        """Learn that ``system``'s ``native_id`` is customer ``customer_id`` (a later link replaces an earlier)."""
        if not native_id or not customer_id:
            return
        key = f"{system}:{native_id}"
        if self.links.get(key) != customer_id:
            self.links[key] = customer_id
            self._dirty = True

    def unlink(self, system: str, native_id: str, customer_id: str | None = None) -> None:
        """Forget ``system``'s ``native_id`` (only if it names ``customer_id``, when given)."""
        key = f"{system}:{native_id}"
        if key in self.links and (customer_id is None or self.links[key] == customer_id):
            del self.links[key]
            self._dirty = True

    def merge(self, system: str, merged_id: str, survivor_id: str) -> None:
        """``merged_id`` was merged into ``survivor_id``: it and every link to it now name the survivor."""
        if not merged_id or not survivor_id or merged_id == survivor_id:
            return
        self.link(system, merged_id, survivor_id)
        for key, cid in list(self.links.items()):
            if cid == merged_id:
                self.links[key] = survivor_id
                self._dirty = True

    def learn_profile(self, customer_id: str, name: str | None = None, email: str | None = None,
                      website: str | None = None) -> None:
        """Remember what identifies a customer, for ranking candidates of unresolved events."""
        if not customer_id:
            return
        prof = self.profiles.setdefault(customer_id, {})
        before = dict(prof)
        if name:
            prof["name"] = name
        if email:
            prof["email"] = email.lower()
        dom = domain_of(website) or domain_of(email)
        if dom:
            prof["domain"] = dom
        if prof != before:
            self._dirty = True

    def candidates(self, name: str | None = None, email: str | None = None, website: str | None = None,
                   limit: int = 3, floor: float = 0.6) -> list[dict[str, Any]]:
        """Known customers that look like the hints, best first: ``{customer_id, score, reasons}``."""
        if not (name or email or website):
            return []
        email_l = email.lower() if email else None
        dom = domain_of(website) or domain_of(email)
        ranked = []
        for cid, prof in self.profiles.items():
            score, reasons = 0.0, []
            if email_l and prof.get("email") == email_l:
                score, reasons = 1.0, ["same email"]
            if dom and prof.get("domain") == dom:
                score = max(score, 0.9)
                reasons.append(f"same domain {dom}")
            if name and prof.get("name"):
                ratio = difflib.SequenceMatcher(None, _norm_name(name), _norm_name(str(prof["name"]))).ratio()
                if ratio >= floor:
                    score = max(score, ratio * 0.95)
                    reasons.append(f"name {prof['name']!r} ~ {name!r} ({ratio:.2f})")
            if score >= floor:
                ranked.append({"customer_id": cid, "score": round(score, 3), "reasons": reasons})
        ranked.sort(key=lambda c: (-c["score"], c["customer_id"]))
        return ranked[:limit]

    def save(self) -> None:
        """Write the map to its file (atomically) when it changed."""
        if not self.path or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".identity-")
        with os.fdopen(fd, "w") as f:
            json.dump({"links": self.links, "profiles": self.profiles}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self._dirty = False
