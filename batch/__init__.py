"""seedance-batch: spreadsheet rows in, Seedance video task ids out (text-, image- and video-to-video).

From Python (notebooks, Airflow, Dagster): ``batch.submit(inputs, output=...)`` and
``batch.collect(...)`` run what the CLI's ``submit`` and ``collect`` run and return a
:class:`~batch.pyapi.Night` (results table and summary); see :mod:`batch.pyapi`.
"""

__version__ = "0.1.0"

# Last: batch.pyapi imports the CLI, which imports __version__ from here.
from batch.pyapi import Night, collect, submit

__all__ = ["Night", "__version__", "collect", "submit"]
