"""What a request costs: seconds of video times a price per second.

The provider publishes no pricing endpoint (``provider-today.md``), so prices are the
operator's data: ``--prices FILE`` (TOML) or a job's ``[prices]``, one table per model
slug, keys resolutions, values USD per second of video at the ``default`` tier::

    ["bytedance/seedance-1.0-lite-t2v"]
    "480p" = 0.01
    "720p" = 0.02
    "1080p" = 0.04
    flex = { "720p" = 0.009 }   # optional: flex otherwise costs 50% (the seed page)

Seconds come from the body as the API reads it: ``frames / 24`` where frames is set
(it wins over duration), else ``duration``, else the model's default duration; the
resolution likewise falls back to the model's default, and where the spec states none (the
i2v and v2v models), to the dearest resolution the prices give for the model.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.errors import ConfigError
from batch.models import ModelSpec

FLEX_SHARE = 0.5  # "flex: high TPD, 50% price" (seed page)
FRAMES_PER_SECOND = 24


def video_seconds(spec: ModelSpec, body: Mapping[str, Any]) -> float:
    frames = body.get("frames")
    if isinstance(frames, int) and not isinstance(frames, bool):
        return frames / FRAMES_PER_SECOND
    duration = body.get("duration", spec.default("duration"))
    return float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 5.0


def resolution_of(spec: ModelSpec, body: Mapping[str, Any]) -> str:
    value = body.get("resolution", spec.default("resolution"))
    return str(value) if value is not None else "default"


def tier_of(spec: ModelSpec, body: Mapping[str, Any]) -> str:
    if "service_tier" not in spec.fields:
        return "default"
    return str(body.get("service_tier", spec.default("service_tier") or "default"))


@dataclass(frozen=True)
class Pricing:
    """USD per second of video by model, tier and resolution."""

    table: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def parse(cls, data: Any, source: str) -> Pricing:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: prices: expected tables of model slug -> resolution = USD per second")
        for slug, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: prices.{slug}: expected a table of resolution = USD per second")
            for key, value in table.items():
                items = value.items() if key == "flex" and isinstance(value, dict) else [(key, value)]
                for res, price in items:
                    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) \
                            or price < 0:
                        raise ConfigError(f"{source}: prices.{slug}.{res}: expected USD per second (a number >= 0)")
        return cls(data, source)

    @classmethod
    def load(cls, path: Path) -> Pricing:
        try:
            return cls.parse(tomllib.loads(path.read_text(encoding="utf-8")), str(path))
        except FileNotFoundError:
            raise ConfigError(f"--prices {path}: no such file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--prices {path}: cannot read ({exc})") from None

    def __bool__(self) -> bool:
        return bool(self.table)

    def per_second(self, slug: str, resolution: str, tier: str) -> float | None:
        table = self.table.get(slug)
        if table is None:
            return None
        if tier == "flex":
            flex = table.get("flex")
            if isinstance(flex, dict) and resolution in flex:
                return float(flex[resolution])
            base = table.get(resolution)
            return None if base is None else float(base) * FLEX_SHARE
        base = table.get(resolution)
        return None if base is None or isinstance(base, dict) else float(base)

    def cost(self, spec: ModelSpec, body: Mapping[str, Any]) -> float | None:
        """USD of one request, or ``None`` without a price for its model and resolution. A
        request that leaves the resolution to the API, for a model whose spec states no
        default, costs what the dearest priced resolution of the model would: an estimate
        and a spend cap never count it low."""
        resolution, tier = resolution_of(spec, body), tier_of(spec, body)
        price = self.per_second(spec.slug, resolution, tier)
        if price is None and resolution == "default" and "resolution" in spec.fields:
            field_ = spec.fields["resolution"]
            prices = [self.per_second(spec.slug, str(r), tier) for r in (field_.enum or ())]
            if prices and None not in prices:
                price = max(p for p in prices if p is not None)
        return None if price is None else price * video_seconds(spec, body)

    def missing(self, spec: ModelSpec) -> list[str]:
        """Resolutions of ``spec`` without a default-tier price (what --max-spend cannot cap)."""
        table = self.table.get(spec.slug, {})
        field_ = spec.fields.get("resolution")
        resolutions = [str(r) for r in (field_.enum or ())] if field_ is not None else ["default"]
        return [r for r in resolutions if r not in table]
