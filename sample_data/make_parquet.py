"""Regenerate sample_data/prompts.parquet: `python sample_data/make_parquet.py`.

The Parquet sample shows what CSV cannot: typed columns and real list columns
(several values in one cell expand into several requests).
"""

from pathlib import Path

import polars as pl

ROWS = [
    ("pq-001", "product", "A smartphone rotating on a turntable, studio light", ["16:9", "9:16"], "1080p", 5, None, True),
    ("pq-002", "product", "Sneakers splashing through a puddle in slow motion", ["1:1"], "720p", 4, 42, False),
    ("pq-003", "product", "A perfume bottle on black velvet, mist spraying", ["9:16"], "1080p", 6, None, True),
    ("pq-004", "travel", "Gondolas drifting along a Venice canal at golden hour", ["21:9"], "720p", 8, None, False),
    ("pq-005", "travel", "Cherry blossom tunnel in Kyoto, people walking slowly beneath", ["16:9", "4:3"], "720p", 5, 7, None),
    ("pq-006", "travel", "雪山脚下的湖泊，晨雾缓缓散去，倒影清晰", ["16:9"], "1080p", 10, None, True),
    ("pq-007", "food", "Pizza dough being tossed in the air in a busy kitchen", ["1:1"], "480p", 3, None, None),
    ("pq-008", "food", "Honey dripping from a wooden dipper onto pancakes, macro", ["9:16"], "720p", 5, 1234, True),
    ("pq-009", "food", "Sushi chef slicing salmon with precise cuts, close-up", None, "720p", 5, None, False),
    ("pq-010", "qa", "Seed below the documented range", ["16:9"], "720p", 5, -5, None),
]

df = pl.DataFrame(
    ROWS,
    schema={
        "id": pl.String, "campaign": pl.String, "prompt": pl.String, "ratio": pl.List(pl.String),
        "resolution": pl.String, "duration": pl.Int64, "seed": pl.Int64, "camera_fixed": pl.Boolean,
    },
    orient="row",
)
df.write_parquet(Path(__file__).with_name("prompts.parquet"))
print(f"wrote {df.height} rows")
