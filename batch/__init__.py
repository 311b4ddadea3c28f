"""seedance-batch: spreadsheet rows in, Seedance video task ids out (text-, image- and video-to-video).

From Python (notebooks, Airflow, Dagster): ``batch.submit(inputs, output=...)`` and
``batch.collect(...)`` run what the CLI's ``submit`` and ``collect`` run and return a
:class:`~batch.pyapi.Night` (results table and summary); see :mod:`batch.pyapi`.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Night", "__version__", "collect", "submit"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, not with the package: ``python -m batch`` imports this file
    # before its own startup signal handling is in place, and loading the API (the CLI,
    # polars, aiohttp...) takes a second or more during which a Ctrl-C would otherwise
    # be a traceback (tests/sim/test_regressions.py).
    if name in ("Night", "collect", "submit"):
        from batch import pyapi

        return getattr(pyapi, name)
    raise AttributeError(f"module 'batch' has no attribute {name!r}")
