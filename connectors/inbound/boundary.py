r"""The input boundary: every native body passes these limits before and while it is parsed.

Checked before parsing: the body's size, that it is UTF-8, and how deeply it nests. While parsing:
strict JSON (``NaN`` / ``Infinity`` refused). After parsing, walking the document without recursion:
its depth, every string's length and that it is valid Unicode (no lone surrogates from ``\ud800``-style
escapes), every number's digits and range, every array's length. Numbers written as text are checked
by ``decimal`` before they are converted, so no conversion costs more than a bounded time.
A body that breaks a limit raises ``BadInput`` naming the limit, its setting and where it was broken.

Each limit is a setting (environment variable, documented default); see ``Limits`` and
connectors/README.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any

from connectors.inbound.exceptions import BadInput

# A JSON string literal; linear (no nested quantifiers), so a hostile body cannot make it backtrack.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_PAIR = re.compile(r"\[\]|\{\}")
# A plain decimal number: sign, digits, optional fraction and exponent; nothing else reaches Decimal.
_NUMBER = re.compile(r"[+-]?(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?")
LONG_MAX = 2**63 - 1  # Avro long


@dataclass(frozen=True)
class Limits:
    """How large, deep and long a native input may be; each field is read from ``CONCORD_INPUT_<NAME>``."""

    record_bytes: int = 900_000  # CONCORD_MAX_RECORD_BYTES: under Kafka's default 1 MB message limit
    depth: int = 64  # CONCORD_INPUT_DEPTH: nesting of arrays and objects
    string_chars: int = 262_144  # CONCORD_INPUT_STRING_CHARS: one string's (or CSV cell's) length
    digits: int = 40  # CONCORD_INPUT_DIGITS: digits in one number (a long has 19)
    exponent: int = 30  # CONCORD_INPUT_EXPONENT: largest decimal exponent of a number written as text
    array_items: int = 10_000  # CONCORD_INPUT_ARRAY_ITEMS: items in one array inside a record
    parse_seconds: float = 5.0  # CONCORD_INPUT_PARSE_SECONDS: the receiver's bound on mapping one body

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The limits, each overridden by its environment variable when set."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = setting_name(f.name)
            raw = env.get(var)
            if not raw:
                continue
            try:
                value = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                raise SystemExit(f"{var}={raw!r} is not a number") from None
            if value <= 0:
                raise SystemExit(f"{var}={raw!r} must be positive")
            values[f.name] = value
        return cls(**values)


def setting_name(limit: str) -> str:
    """The environment variable that sets ``limit``."""
    return "CONCORD_MAX_RECORD_BYTES" if limit == "record_bytes" else f"CONCORD_INPUT_{limit.upper()}"


def _over(what: str, limits: Limits, limit: str, value: int, where: str = "") -> BadInput:
    at = f" at {where}" if where else ""
    return BadInput(f"{what}{at} is over the {getattr(limits, limit)} limit "
                    f"({setting_name(limit)}; got {value})")


def text(data: bytes, what: str = "body") -> str:
    """``data`` as UTF-8 text (a leading BOM dropped); BadInput saying at which byte it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def check_depth(doc: str, limits: Limits) -> None:
    """BadInput when arrays and objects in JSON text ``doc`` nest deeper than ``limits.depth``.

    Only brackets are kept, then innermost pairs are removed a level per pass (each pass one regular-expression
    scan): a document needing more passes than the limit nests too deeply. Brackets inside strings are cut
    out only when the quick reading (with them) says too deep; ``walk`` measures the parsed depth exactly.
    """
    if doc.count("[") + doc.count("{") <= limits.depth:
        return  # cannot be deeper than the number of brackets: the common case costs two counts
    if _within(_NOT_BRACKET.sub("", doc), limits.depth):
        return
    if not _within(_NOT_BRACKET.sub("", _STRING.sub("", doc)), limits.depth):
        raise BadInput(f"nesting depth is over the {limits.depth} limit ({setting_name('depth')})")


def _within(brackets: str, depth: int) -> bool:
    for _ in range(depth):
        inner = _PAIR.sub("", brackets)
        if not inner or inner == brackets:
            return True  # balanced within the limit, or unbalanced: then the parser says what is wrong
        brackets = inner
    return False


def _check_number(value: int | float, path: str, limits: Limits) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadInput(f"number at {path} is out of range")
    elif not isinstance(value, bool) and abs(value) >= 10**limits.digits:
        raise BadInput(f"number at {path} has {len(str(abs(value)))} digits, over the {limits.digits} limit "
                       f"({setting_name('digits')})")


def _constant(token: str) -> Any:
    raise BadInput(f"{token} is not JSON (strict JSON has no NaN or Infinity)")


def walk(doc: Any, limits: Limits, split: bool = False) -> None:
    """BadInput when a parsed document nests too deeply, or holds a string, number or array over a limit."""
    stack: list[tuple[Any, str, int]] = [(doc, "$", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            _check_string(node, path, limits)
        elif isinstance(node, int | float):
            _check_number(node, path, limits)
        elif isinstance(node, dict | list):
            if depth >= limits.depth:
                raise BadInput(f"nesting depth at {path} is over the {limits.depth} limit ({setting_name('depth')})")
            if isinstance(node, dict):
                for k, v in node.items():
                    _check_string(k, f"{path} key", limits)
                    stack.append((v, f"{path}.{k[:40]}", depth + 1))
            else:
                if len(node) > limits.array_items and not (split and path == "$"):
                    raise _over("array length", limits, "array_items", len(node), path)
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))


def _check_string(s: str, path: str, limits: Limits) -> None:
    if len(s) > limits.string_chars:
        raise _over("string length", limits, "string_chars", len(s), path)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadInput(f"string at {path} is not valid Unicode: {exc.reason} at character {exc.start}") from None


class NotJSON(BadInput):
    """The text is not JSON at all (as opposed to JSON that breaks a limit)."""


def decoder(limits: Limits) -> json.JSONDecoder:
    """A strict JSON decoder (no NaN or Infinity); numbers are converted in C, checked by ``walk``.

    Converting a JSON number costs little (Python refuses integers over 4300 digits; a float is a float):
    the slow conversions are of numbers in text fields, which ``decimal`` bounds.
    """
    return json.JSONDecoder(parse_constant=_constant)


def loads(data: bytes | str, limits: Limits | None = None, split: bool = False) -> Any:
    """Parse one JSON document within ``limits``; BadInput (never another error) for anything it refuses.

    ``split``: the top-level array is a list of records (a file), so its own length is not limited.
    """
    limits = limits or Limits.from_env()
    doc = data if isinstance(data, str) else text(data)
    check_depth(doc, limits)
    try:
        parsed = decoder(limits).decode(doc)
    except BadInput:
        raise
    except RecursionError:  # a depth the pre-scan missed cannot crash the caller
        raise BadInput(f"nesting depth is over the {limits.depth} limit ({setting_name('depth')})") from None
    except ValueError as exc:
        raise NotJSON(f"not JSON: {exc}") from None
    walk(parsed, limits, split)
    return parsed


def decimal(value: str, what: str, kind: str = "a number", limits: Limits | None = None) -> Decimal:
    """A decimal from text, refusing before conversion any that has too many digits or too large an exponent."""
    limits = limits or Limits.from_env()
    s = value.strip()
    m = _NUMBER.fullmatch(s)
    if not m or not (m.group(1) or m.group(2)):
        raise BadInput(f"{what} {value[:40]!r} is not {kind}")
    whole, frac, exp = m.group(1) or "", m.group(2) or "", m.group(3)
    if len(whole) + len(frac) > limits.digits:
        raise BadInput(f"{what} has {len(whole) + len(frac)} digits, over the {limits.digits} limit "
                       f"({setting_name('digits')})")
    if exp is not None and (len(exp.lstrip("+-")) > 6 or abs(int(exp)) > limits.exponent):
        raise BadInput(f"{what} {value[:40]!r} has an exponent over {limits.exponent} "
                       f"({setting_name('exponent')})")
    try:
        return Decimal(s)
    except InvalidOperation:
        raise BadInput(f"{what} {value[:40]!r} is not {kind}") from None


def long(value: int, what: str) -> int:
    """``value`` when it fits an Avro long; BadInput naming ``what`` otherwise."""
    if not -LONG_MAX - 1 <= value <= LONG_MAX:
        raise BadInput(f"{what} {str(value)[:24]}... is out of range (a signed 64-bit integer)")
    return value
