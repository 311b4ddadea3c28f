"""Print the README's table of shipped models from the specs: `python tools/models_table.py`.

The README holds the output between the markers `<!-- models:begin -->` and
`<!-- models:end -->`; tests/test_models.py checks that it matches the specs, so the
README cannot drift from what the validator and the fake read.
"""

from __future__ import annotations

from batch.models import shipped


def table() -> str:
    lines = ["| model | kind | completeness | fields (* required) | named rules |", "|---|---|---|---|---|"]
    for slug, spec in sorted(shipped().items()):
        fields = ", ".join(f"`{name}`{'*' if f.required else ''}" for name, f in spec.fields.items())
        rules = ", ".join(f"`{r}`" for r in spec.rules) or "-"
        lines.append(f"| `{slug}` | {spec.kind} | {spec.completeness} ({spec.source_date}) | {fields} | {rules} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
