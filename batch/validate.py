"""The API's request fields and their documented constraints.

One :class:`Field` per body field of the Seedance 1.0 lite text-to-video endpoint
(``shared/api/seedance-1.0-lite-t2v.md``). :func:`coerce` turns a cell value as a
spreadsheet gives it (``"5.0"``, ``"yes"``, ``5``, ``True``) into the JSON value the
API expects, or raises :class:`RuleError` naming the field, the value and the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

TIERS = ("flex", "default")
DEFAULT_TIER = "flex"

_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


class RuleError(ValueError):
    """A value breaks a documented constraint; the message names field, value and rule."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        shown = repr(value) if isinstance(value, str) else str(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{field}={shown}: {rule}")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "str" | "enum" | "int" | "bool"
    choices: tuple[str, ...] = ()
    lo: int | None = None
    hi: int | None = None

    @property
    def rule(self) -> str:
        if self.kind == "enum":
            return "must be one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "must be a boolean (true/false/1/0/yes/no)"
        if self.kind == "int":
            return f"must be an integer in [{self.lo}, {self.hi}]"
        return "must be text"


FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("prompt", "str"),
        Field("ratio", "enum", ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive")),
        Field("resolution", "enum", ("480p", "720p", "1080p")),
        Field("duration", "int", lo=2, hi=12),
        Field("frames", "int", lo=29, hi=289),
        Field("seed", "int", lo=-1, hi=2147483647),
        Field("camera_fixed", "bool"),
        Field("service_tier", "enum", TIERS),
        Field("execution_expires_after", "int", lo=3600, hi=259200),
        Field("return_last_frame", "bool"),
    )
}
FIELD_NAMES: tuple[str, ...] = tuple(FIELDS)
PROMPT_MAX_CHARS = 2000


def _to_int(f: Field, value: Any) -> int:
    if isinstance(value, bool):
        raise RuleError(f.name, value, f.rule)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise RuleError(f.name, value, f.rule)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise RuleError(f.name, value, f.rule) from None
        # Spreadsheets write integers as "5.0"; "5.5" is a real mistake.
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise RuleError(f.name, value, f.rule)


def _to_bool(f: Field, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise RuleError(f.name, value, f.rule)


def coerce(name: str, value: Any) -> Any:
    """Return ``value`` as the API's JSON type for field ``name``, or raise RuleError."""
    f = FIELDS[name]
    if f.kind == "int":
        number = _to_int(f, value)
        assert f.lo is not None and f.hi is not None
        if not f.lo <= number <= f.hi:
            raise RuleError(name, value, f.rule)
        if name == "frames" and (number - 25) % 4:
            raise RuleError(name, value, "must be 25 + 4n in [29, 289]")
        return number
    if f.kind == "bool":
        return _to_bool(f, value)
    if not isinstance(value, str):
        raise RuleError(name, value, f.rule)
    if f.kind == "enum":
        text = value.strip()
        if text not in f.choices:
            raise RuleError(name, value, f.rule)
        return text
    # prompt: the limit is in characters (code points), not UTF-8 bytes.
    if not value.strip():
        raise RuleError(name, value, "must not be empty")
    if len(value) > PROMPT_MAX_CHARS:
        raise RuleError(
            name, value, f"must be at most {PROMPT_MAX_CHARS} characters (has {len(value)})"
        )
    return value
