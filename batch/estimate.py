"""What a night would send, and what it would cost, before anything is sent.

Guarantee: the estimate counts only the requests a run would *send* (``dry_run`` rows
after the ledger was consulted), never those an earlier run submitted (``skipped``) or
may have submitted (``unknown``). It names the two ways a sheet spends more than its
author may think: rows whose id was submitted before with other content (an edited
prompt, a changed parameter: each a new paid video) and identical requests (each its
own video, on purpose).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from batch.models import Catalog
from batch.prices import FLEX_SHARE, FRAMES_PER_SECOND, Pricing

NO_TIER = "no tier"  # a model without service_tier (the 2.0 family): its one price
LABEL = "__label"  # a request frame's hidden column: the row's id (the id column itself is passed through)


Labels = Callable[[Sequence[str]], dict[str, set[str]]]  # Ledger.labels: label -> request ids sent under it


def count_edited(rows: pl.DataFrame, labels: Labels) -> int:
    """Rows whose id (label) was sent before under another request id: the row was
    edited since, and the request is a new paid video. The dry run counts them among what
    it would send, a real run among what it sent (one rule for both)."""
    if LABEL not in rows.columns:
        return 0
    labelled = rows.filter(pl.col(LABEL).is_not_null()).select(LABEL, "request_id")
    if not labelled.height:
        return 0
    known = labels(labelled[LABEL].unique().to_list())
    return sum(1 for label, rid in labelled.iter_rows() if label in known and known[label] - {rid})


@dataclass
class Estimator:
    """Accumulates the planned (``dry_run``) rows of a run, chunk by chunk."""

    catalog: Catalog
    pricing: Pricing = field(default_factory=Pricing)
    labels: Labels | None = None  # Ledger.labels, read-only
    requests: int = 0
    by_tier: Counter[str] = field(default_factory=Counter)
    seconds_by_resolution: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    unpriced: Counter[str] = field(default_factory=Counter)
    edited: int = 0
    identical: int = 0

    def _defaults(self, models: list[str], name: str, fallback: Any) -> pl.Expr:
        mapping = {}
        for slug in models:
            spec = self.catalog.find(slug)
            value = spec.default(name) if spec is not None else None
            mapping[slug] = value if value is not None else fallback
        return pl.col("model").replace_strict(mapping, default=fallback)

    def add(self, planned: pl.DataFrame) -> None:
        if planned.height == 0:
            return
        self.requests += planned.height
        models = planned["model"].unique().to_list()

        def col(name: str) -> pl.Expr:
            return pl.col(name) if name in planned.columns else pl.lit(None)

        duration = col("duration").cast(pl.Float64, strict=False).fill_null(
            self._defaults(models, "duration", 5).cast(pl.Float64))
        seconds = pl.when(col("frames").is_not_null()) \
            .then(col("frames").cast(pl.Float64, strict=False) / FRAMES_PER_SECOND).otherwise(duration)
        frame = planned.select(
            model=pl.col("model"),
            resolution=col("resolution").cast(pl.String).fill_null(
                self._defaults(models, "resolution", "default").cast(pl.String)),
            tier=col("service_tier").cast(pl.String).fill_null(pl.lit(NO_TIER)),
            seconds=seconds,
        )
        for tier, n in frame.group_by("tier", maintain_order=True).len().iter_rows():
            self.by_tier[tier] += n
        grouped = frame.group_by(["model", "resolution", "tier"], maintain_order=True).agg(
            pl.col("seconds").sum(), pl.len().alias("n"))
        for slug, resolution, tier, total, n in grouped.iter_rows():
            self.seconds_by_resolution[resolution] += total
            price = self.pricing.per_second(slug, resolution, tier) if self.pricing else None
            if price is None:
                self.unpriced[slug] += n
            else:
                self.cost_usd += price * total
        self.identical += planned.filter(pl.col("request_id").str.contains(r"-\d+$")).height
        if self.labels is not None:
            self.edited += count_edited(planned, self.labels)

    def as_dict(self) -> dict[str, Any] | None:
        if not self.requests:
            return None
        out: dict[str, Any] = {
            "would_send": self.requests,
            "requests_by_tier": dict(sorted(self.by_tier.items())),
            "video_seconds_by_resolution": {k: round(v, 1) for k, v in sorted(self.seconds_by_resolution.items())},
            "edited": self.edited,
            "identical": self.identical,
        }
        if self.pricing:
            out["cost_usd"] = round(self.cost_usd, 2)
            out["unpriced"] = dict(self.unpriced)
            out["flex_share"] = FLEX_SHARE
        return out
