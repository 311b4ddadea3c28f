"""Request validation, driven by the model's specification (:mod:`batch.models`).

:class:`Validator` compiles each field of a model's JSON Schema once (type, enum,
minimum/maximum, minLength/maxLength in characters, arrays with their items and
minItems/maxItems) into a converter that turns a cell as a spreadsheet gives it
(``"5.0"``, ``"yes"``, ``5``, ``True``, ``'["a.png"]'``) into the JSON value the API
expects, or raises :class:`RuleError` naming the field, the value and the rule. Enum
values match case-insensitively and trimmed (``720P`` is ``720p``). The named rules a
schema cannot say (:data:`RULES`) run after the fields.

Why compiled converters rather than a JSON Schema library: the cell must be *converted*
per field before any schema can check it, and converting is most of the work; the
checks then cost a comparison or two. Measured with ``benchmarks/bench.py`` (validator
phase, the same 1,000,000 requests): see README "Benchmark". The fake API checks whole
bodies with ``fastjsonschema`` against the same documents, an independent reading of
the same specs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from batch.api import DEFAULT_MODEL
from batch.models import FieldSpec, ModelSpec, shipped

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
class FieldRule:
    """A rule on one field's value, beyond what its schema says."""

    field: str
    ok: Callable[[Any], bool]
    rule: str


@dataclass(frozen=True)
class BodyRule:
    """A rule across fields of one request."""

    ok: Callable[[dict[str, Any]], bool]
    message: str


def _frames_ok(v: Any) -> bool:
    return (v - 25) % 4 == 0


def _one_frame_image(b: dict[str, Any]) -> bool:
    return "first_frame_image" in b or "last_frame_image" in b


def _frames_apart_from_references(b: dict[str, Any]) -> bool:
    return not (_one_frame_image(b) and "reference_images" in b)


RULES: dict[str, FieldRule | BodyRule] = {
    "frames_25_plus_4n": FieldRule("frames", _frames_ok, "must be 25 + 4n in [29, 289]"),
    "first_or_last_frame_image": BodyRule(
        _one_frame_image, "first_frame_image, last_frame_image: at least one is required"),
    "frame_images_not_with_references": BodyRule(
        _frames_apart_from_references,
        "reference_images: not together with first_frame_image or last_frame_image"),
}


def to_int(name: str, rule: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RuleError(name, value, rule)
    if isinstance(value, int):
        return value
    if isinstance(value, (float, Decimal)):  # a DECIMAL column (databases, Spark) as a float does
        if (value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)) and value == int(value):
            return int(value)
        raise RuleError(name, value, rule)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise RuleError(name, value, rule) from None
        # Spreadsheets write integers as "5.0"; "5.5" is a real mistake.
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise RuleError(name, value, rule)


def to_bool(name: str, rule: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, Decimal) and value.is_finite() and value in (0, 1):  # sNaN would raise on ==
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise RuleError(name, value, rule)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def rule_text(f: FieldSpec) -> str:
    """The rule a field's value must meet, in words."""
    if f.type == "boolean":
        return "must be a boolean (true/false/1/0/yes/no)"
    if f.type in ("integer", "number"):
        word = "an integer" if f.type == "integer" else "a number"
        if f.enum is not None:
            values = sorted(v for v in f.enum if isinstance(v, (int, float)))
            if values and f.type == "integer" and values == list(range(int(values[0]), int(values[-1]) + 1)):
                return f"must be {word} in [{values[0]}, {values[-1]}]"
            return "must be one of " + ", ".join(_num(v) for v in values)
        if f.minimum is not None and f.maximum is not None:
            return f"must be {word} in [{_num(f.minimum)}, {_num(f.maximum)}]"
        if f.minimum is not None:
            return f"must be {word} >= {_num(f.minimum)}"
        if f.maximum is not None:
            return f"must be {word} <= {_num(f.maximum)}"
        return f"must be {word}"
    if f.type == "array":
        return 'must be a list: a JSON array like ["a", "b"] in the cell, or a Parquet list'
    if f.enum is not None:
        return "must be one of " + ", ".join(str(v) for v in f.enum)
    return "must be text"


def compile_field(f: FieldSpec, field_rules: list[FieldRule]) -> Callable[[Any], Any]:
    """A converter for one field: cell value → API value, or :class:`RuleError`."""
    name, rule = f.name, rule_text(f)
    extra = [r for r in field_rules if r.field == name]

    def finish(value: Any) -> Any:
        for r in extra:
            if not r.ok(value):
                raise RuleError(name, value, r.rule)
        return value

    if f.type in ("integer", "number"):
        allowed = frozenset(f.enum) if f.enum is not None else None
        lo, hi, integer = f.minimum, f.maximum, f.type == "integer"

        def number(value: Any) -> Any:
            if integer:
                n: Any = to_int(name, rule, value)
            else:
                try:
                    n = float(value.strip() if isinstance(value, str) else value)
                except (TypeError, ValueError):
                    raise RuleError(name, value, rule) from None
                if isinstance(value, bool) or not math.isfinite(n):
                    raise RuleError(name, value, rule)
            if (allowed is not None and n not in allowed) or (lo is not None and n < lo) or (hi is not None and n > hi):
                raise RuleError(name, value, rule)
            return finish(n)
        return number
    if f.type == "boolean":
        return lambda value: finish(to_bool(name, rule, value))
    if f.type == "array":
        item = compile_field(f.item, []) if f.item is not None else (lambda v: v)
        lo_items, hi_items = f.min_items, f.max_items

        def array(value: Any) -> Any:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise RuleError(name, value, rule)
            if lo_items is not None and len(items) < lo_items:
                raise RuleError(name, value, f"must hold at least {lo_items} items (has {len(items)})")
            if hi_items is not None and len(items) > hi_items:
                raise RuleError(name, value, f"must hold at most {hi_items} items (has {len(items)})")
            return finish([item(v) for v in items])
        return array
    if f.enum is not None:
        choices = {str(v).strip().lower(): v for v in f.enum}

        def enum(value: Any) -> Any:
            if not isinstance(value, str) or (found := choices.get(value.strip().lower())) is None:
                raise RuleError(name, value, rule)
            return finish(found)
        return enum
    lo_len, hi_len = f.min_length, f.max_length

    def text(value: Any) -> Any:
        if not isinstance(value, str):
            raise RuleError(name, value, rule)
        if lo_len and not value.strip():
            raise RuleError(name, value, "must not be empty")
        if lo_len is not None and len(value) < lo_len:
            raise RuleError(name, value, f"must be at least {lo_len} characters (has {len(value)})")
        # The limit is in characters (code points), not UTF-8 bytes, as JSON Schema counts.
        if hi_len is not None and len(value) > hi_len:
            raise RuleError(name, value, f"must be at most {hi_len} characters (has {len(value)})")
        return finish(value)
    return text


class Validator:
    """One model's fields compiled, and its named rules."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        rules = [RULES[r] for r in spec.rules if r in RULES]
        field_rules = [r for r in rules if isinstance(r, FieldRule)]
        self.body_rules = [r for r in rules if isinstance(r, BodyRule)]
        self.converters = {name: compile_field(f, field_rules) for name, f in spec.fields.items()}
        self.required = [name for name, f in spec.fields.items() if f.required]
        self.unknown_rules = [r for r in spec.rules if r not in RULES]

    def convert(self, name: str, value: Any) -> Any:
        return self.converters[name](value)

    def check_body(self, body: dict[str, Any]) -> list[str]:
        """What a converted body still breaks: required fields, then the named rules."""
        errors = []
        for name in self.required:
            if name not in body:
                errors.append("prompt: missing (empty cell)" if name == "prompt"
                              else f"{name}: missing (required by {self.spec.slug})")
        if not errors:
            errors.extend(r.message for r in self.body_rules if not r.ok(body))
        return errors


def coerce(name: str, value: Any, model: str = DEFAULT_MODEL) -> Any:
    """One field of a shipped model: cell value → API value, or :class:`RuleError`."""
    return _shipped_validator(model).convert(name, value)


@cache
def _shipped_validator(model: str) -> Validator:
    return Validator(shipped()[model])
