"""Print the README's tables of shipped models and of header synonyms from the specs:
`python tools/models_table.py` (add `aliases` for the second).

The README holds the outputs between the markers `<!-- models:begin -->` and
`<!-- models:end -->`, and `<!-- aliases:begin -->` and `<!-- aliases:end -->`;
tests check that they match the specs, so the README cannot drift from what the
validator, the header matching and the fake read.
"""

from __future__ import annotations

import sys

from batch.models import shipped


def table() -> str:
    lines = ["| model | kind | completeness | fields (* required) | named rules |", "|---|---|---|---|---|"]
    for slug, spec in sorted(shipped().items()):
        fields = ", ".join(f"`{name}`{'*' if f.required else ''}" for name, f in spec.fields.items())
        rules = ", ".join(f"`{r}`" for r in spec.rules) or "-"
        lines.append(f"| `{slug}` | {spec.kind} | {spec.completeness} ({spec.source_date}) | {fields} | {rules} |")
    return "\n".join(lines)


def aliases_table() -> str:
    """Each field and the header synonyms its specs declare (``x-aliases``), over every
    shipped model that has the field."""
    synonyms: dict[str, dict[str, None]] = {}
    for _, spec in sorted(shipped().items()):
        for name, f in spec.fields.items():
            synonyms.setdefault(name, {}).update(dict.fromkeys(f.aliases))
    lines = ["| field | also read from headers named |", "|---|---|"]
    for name, aliases in synonyms.items():
        lines.append(f"| `{name}` | {', '.join(f'`{a}`' for a in aliases) or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(aliases_table() if sys.argv[1:] == ["aliases"] else table())
