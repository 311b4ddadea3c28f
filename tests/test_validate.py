from decimal import Decimal

import pytest

from batch.validate import RuleError, coerce


@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("duration", "5", 5), ("duration", "5.0", 5), ("duration", 5.0, 5), ("duration", " 12 ", 12), ("duration", 2, 2),
    ("frames", "29", 29), ("frames", 289, 289), ("frames", "53", 53),
    ("seed", "-1", -1), ("seed", 2147483647, 2147483647), ("seed", "0", 0),
    ("execution_expires_after", "3600", 3600), ("execution_expires_after", 259200, 259200),
    ("camera_fixed", "true", True), ("camera_fixed", "FALSE", False), ("camera_fixed", "1", True),
    ("camera_fixed", "0", False), ("camera_fixed", "yes", True), ("camera_fixed", "No", False),
    ("return_last_frame", True, True), ("return_last_frame", 0, False),
    ("ratio", "9:16", "9:16"), ("ratio", " adaptive ", "adaptive"), ("resolution", "1080p", "1080p"),
    ("service_tier", "flex", "flex"), ("service_tier", "default", "default"),
    ("prompt", "a" * 2000, "a" * 2000), ("prompt", "熊" * 2000, "熊" * 2000), ("prompt", "x", "x"),
    # A database's or Spark's DECIMAL column (found from outside: "duration=5: must be an integer in [2, 12]")
    ("duration", Decimal("5"), 5), ("seed", Decimal("42.00"), 42), ("camera_fixed", Decimal("1"), True),
    ("camera_fixed", Decimal("0.0"), False),
])
def test_valid_values_coerce_to_api_types(name: str, raw: object, expected: object) -> None:
    value = coerce(name, raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(("name", "raw", "rule"), [
    ("duration", "1", "[2, 12]"), ("duration", "13", "[2, 12]"), ("duration", "5.5", "integer"),
    ("duration", "five", "integer"), ("duration", True, "integer"), ("duration", "nan", "integer"),
    ("frames", "25", "[29, 289]"), ("frames", "293", "[29, 289]"), ("frames", "30", "25 + 4n"), ("frames", 31, "25 + 4n"),
    ("seed", "-2", "[-1, 2147483647]"), ("seed", 2147483648, "[-1, 2147483647]"),
    ("execution_expires_after", 3599, "[3600, 259200]"), ("execution_expires_after", "259201", "[3600, 259200]"),
    ("camera_fixed", "maybe", "boolean"), ("camera_fixed", 2, "boolean"), ("return_last_frame", "", "boolean"),
    ("ratio", "2:1", "one of"), ("ratio", "16/9", "one of"), ("resolution", "4k", "one of"),
    ("service_tier", "cheap", "one of"), ("ratio", 16, "one of"),
    ("prompt", "", "empty"), ("prompt", "   ", "empty"), ("prompt", "a" * 2001, "at most 2000 characters"),
    ("prompt", "熊" * 2001, "at most 2000 characters"), ("prompt", 42, "text"),
    ("duration", Decimal("5.5"), "integer"), ("duration", Decimal("NaN"), "integer"), ("seed", Decimal("Infinity"), "integer"),
    ("duration", Decimal("13"), "[2, 12]"), ("camera_fixed", Decimal("2"), "boolean"),
])
def test_each_rule_names_field_value_and_rule(name: str, raw: object, rule: str) -> None:
    with pytest.raises(RuleError) as info:
        coerce(name, raw)
    message = str(info.value)
    assert message.startswith(f"{name}=")
    assert rule in message
    assert info.value.field == name


def test_prompt_limit_counts_characters_not_bytes() -> None:
    # 2000 CJK characters are 6000 UTF-8 bytes and still valid.
    text = "中" * 2000
    assert len(text.encode()) == 6000
    assert coerce("prompt", text) == text
