"""Model specifications as data: which models exist and what each one's request may hold.

One JSON document per model, in the shape the provider publishes at
``https://www.modellix.ai/models/{provider}/{model}/api_schema`` (``servers[0].url``
and ``post.requestBody.content."application/json".schema``), plus our
``x-seedance-batch`` block (kind, completeness, source date, the named cross-field
rules a schema cannot say). The package ships the models ``tools/specs_from_family.py``
wrote from the facts file; ``models fetch`` and ``models add`` put documents in
``<state dir>/models/``, and those win over the shipped ones.

Guarantee: this module is the one place that says what a model's fields are. The
validator (:mod:`batch.validate`), the header matching (:mod:`batch.expand`), the fake
API and the README's model table all read these specs; nothing else lists fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch.api import check_slug
from batch.errors import ConfigError
from batch.names import normalize_name
from batch.storage import exclusive_temp

SHIPPED = "shipped"


@dataclass(frozen=True)
class FieldSpec:
    """One body field, as its JSON Schema describes it."""

    name: str
    type: str  # string, integer, number, boolean, array
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    item: FieldSpec | None = None
    default: Any = None
    required: bool = False
    inferred: bool = False
    aliases: tuple[str, ...] = ()  # header synonyms (``x-aliases``), normalised

    @classmethod
    def from_schema(cls, name: str, schema: dict[str, Any], required: bool) -> FieldSpec:
        kind = schema.get("type", "string")
        if isinstance(kind, list):  # ["string", "null"]: the non-null one
            kind = next((k for k in kind if k != "null"), "string")
        item = schema.get("items")
        return cls(
            name, str(kind),
            enum=tuple(schema["enum"]) if isinstance(schema.get("enum"), list) else None,
            minimum=schema.get("minimum"), maximum=schema.get("maximum"),
            min_length=schema.get("minLength"), max_length=schema.get("maxLength"),
            min_items=schema.get("minItems"), max_items=schema.get("maxItems"),
            item=cls.from_schema(f"{name}[]", item, False) if isinstance(item, dict) else None,
            default=schema.get("default"), required=required, inferred=bool(schema.get("x-inferred")),
            aliases=_aliases(schema.get("x-aliases")),
        )

    @property
    def is_text(self) -> bool:
        """Free text: a number or a date in its cell is a mistake, not a value."""
        return self.type == "string" and self.enum is None


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    kind: str  # t2v, i2v, v2v
    completeness: str  # complete, nearly complete, ...
    source_date: str
    route: str  # servers[0].url: the documented submit URL
    fields: dict[str, FieldSpec]
    rules: tuple[str, ...] = ()
    origin: str = SHIPPED  # shipped, fetched, added
    notes: tuple[str, ...] = field(default=())
    provider_default: str | None = None  # the kind the provider's own tools default to this model for
    schema: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the body's JSON Schema

    @property
    def route_path(self) -> str:
        return urlsplit(self.route).path

    def default(self, name: str) -> Any:
        spec = self.fields.get(name)
        return spec.default if spec is not None else None


def _aliases(value: Any) -> tuple[str, ...]:
    """A spec's ``x-aliases``, normalised; anything else in that place is ignored (a
    document from outside is data: a wrong type costs the synonyms, not the spec)."""
    if not isinstance(value, list):
        return ()
    return tuple(dict.fromkeys(n for v in value if isinstance(v, str) and (n := normalize_name(v))))


def parse_spec(doc: Any, origin: str, fallback: ModelSpec | None = None, slug: str | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from a schema document; ``fallback`` (the shipped spec of the
    same model) supplies our block when the document is the provider's bare one."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    try:
        url = doc["servers"][0]["url"]
        schema = doc["post"]["requestBody"]["content"]["application/json"]["schema"]
    except (KeyError, IndexError, TypeError):
        raise ValueError('expected servers[0].url and post.requestBody.content."application/json".schema') from None
    if not isinstance(url, str) or not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        raise ValueError("the request schema has no properties")
    ours = doc.get("x-seedance-batch") if isinstance(doc.get("x-seedance-batch"), dict) else {}
    slug = ours.get("slug") or slug or (fallback.slug if fallback else None) or _slug_from_url(url)
    required = set(schema.get("required") or [])
    fields = {name: FieldSpec.from_schema(name, prop if isinstance(prop, dict) else {}, name in required)
              for name, prop in schema["properties"].items()}
    if fallback is not None:  # the provider's bare document has no synonyms: keep ours
        fields = {name: f if f.aliases or name not in fallback.fields
                  else replace(f, aliases=fallback.fields[name].aliases) for name, f in fields.items()}
    base = fallback
    return ModelSpec(
        slug=check_slug(str(slug)),
        kind=str(ours.get("kind") or (base.kind if base else "unknown")),
        completeness=str(ours.get("completeness") or ("as published" if origin == "fetched" else "unknown")),
        source_date=str(ours.get("source_date") or ""),
        route=url,
        fields=fields,
        rules=tuple(ours.get("rules") if "rules" in ours else (base.rules if base else ())),
        origin=origin,
        notes=tuple(str(n) for n in ours.get("notes", ())),
        provider_default=str(ours["provider_default"]) if ours.get("provider_default")
        else (base.provider_default if base else None),
        schema=schema,
    )


def _slug_from_url(url: str) -> str:
    parts = [p for p in urlsplit(url).path.split("/") if p and p not in ("api", "v1", "async")]
    parts = [p for p in parts if "-to-" not in p]
    return "/".join(parts[-2:])


def spec_filename(slug: str) -> str:
    return check_slug(slug).replace("/", "__") + ".json"


@cache
def shipped() -> dict[str, ModelSpec]:
    """The specs in the package (read once: they are part of the install)."""
    found = {}
    for entry in resources.files("batch").joinpath("specs").iterdir():
        if entry.name.endswith(".json") and not entry.name.startswith("_"):
            spec = parse_spec(json.loads(entry.read_text(encoding="utf-8")), SHIPPED)
            found[spec.slug] = spec
    return found


@cache
def names_only() -> dict[str, str]:
    """Seedance models the sources name without stating their fields (slug → kind): not
    specs (nothing can be validated against them), only known to exist."""
    doc = json.loads(resources.files("batch").joinpath("specs", "_names_only.json").read_text(encoding="utf-8"))
    return {m["slug"]: m["kind"] for m in doc["models"]}


MAX_SPEC_BYTES = 1 << 20


def save_spec(directory: Path, doc: Any, origin: str, source: str, slug: str | None = None) -> ModelSpec:
    """Check a schema document and keep it in ``directory`` (where it wins over the
    shipped spec of its model); our block records where it came from and, for the
    provider's bare document, carries over the shipped spec's kind and named rules."""
    known = shipped()
    fallback = known.get(slug) if slug else None
    try:
        spec = parse_spec(doc, origin, fallback, slug)
    except ValueError as exc:
        raise ConfigError(f"{source}: not a model schema document ({exc})") from None
    fallback = fallback or known.get(spec.slug)
    ours = dict(doc.get("x-seedance-batch") or {})
    ours.update({"slug": spec.slug, "origin": origin, "source": source, "saved_at": datetime.now(UTC).isoformat()})
    if fallback is not None:
        ours.setdefault("kind", fallback.kind)
        ours.setdefault("rules", list(fallback.rules))
    ours.setdefault("completeness", "as published" if origin == "fetched" else "as added")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / spec_filename(spec.slug)
    tmp = exclusive_temp(path)  # never a planted name
    tmp.write_text(json.dumps({**doc, "x-seedance-batch": ours}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return parse_spec(json.loads(path.read_text(encoding="utf-8")), origin, fallback, spec.slug)


class Catalog:
    """The models this run knows: shipped ones, overridden by those in ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.models = dict(shipped())
        self.problems: list[str] = []
        self._aliases: dict[str, str] | None = None
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                try:
                    doc = json.loads(path.read_text(encoding="utf-8"))
                    origin = str(doc.get("x-seedance-batch", {}).get("origin", "added")) \
                        if isinstance(doc, dict) else "added"
                    slug = path.name.removesuffix(".json").replace("__", "/")
                    spec = parse_spec(doc, origin, self.models.get(slug), slug)
                except (OSError, ValueError) as exc:
                    self.problems.append(f"{path}: {exc}")
                    continue
                self.models[spec.slug] = spec

    def get(self, slug: str) -> ModelSpec:
        spec = self.models.get(slug.strip().lower())
        if spec is None:
            raise ConfigError(f"model {slug!r} is not known (known: {', '.join(sorted(self.models))}; "
                              "add one with 'seedance-batch models fetch SLUG' or 'models add FILE')")
        return spec

    def find(self, slug: str) -> ModelSpec | None:
        return self.models.get(slug.strip().lower())

    def known_fields(self) -> set[str]:
        return {name for spec in self.models.values() for name in spec.fields}

    def aliases(self) -> dict[str, str]:
        """Every header synonym of the known models → its field. A synonym that is
        another field's own name, or names two fields across models, means nothing (an
        added spec cannot make a header ambiguous); it is dropped with a problem noted."""
        if self._aliases is None:
            self._aliases = self._collect_aliases()
        return self._aliases

    def _collect_aliases(self) -> dict[str, str]:
        fields = self.known_fields()
        found: dict[str, str] = {}
        clashes: set[str] = set()
        for spec in self.models.values():
            for name, f in spec.fields.items():
                for alias in f.aliases:
                    if alias in fields or found.setdefault(alias, name) != name:
                        clashes.add(alias)
        for alias in sorted(clashes):
            found.pop(alias, None)
            problem = f"header synonym {alias!r} is ambiguous across the model specs; ignored"
            if problem not in self.problems:
                self.problems.append(problem)
        return found

    def resolve(self, name: str) -> str | None:
        """The field a header or parameter name means (its own name or a synonym), or ``None``."""
        norm = normalize_name(name)
        if norm in self.known_fields():
            return norm
        return self.aliases().get(norm)

    def with_field(self, name: str, slugs: Iterable[str]) -> list[str]:
        return [s for s in slugs if (m := self.find(s)) is not None and name in m.fields]
