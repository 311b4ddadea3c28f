"""How a header, a ``--param`` or a job-file column names a field: one normalisation,
shared by the loader (which looks for the prompt column before any spec is read) and the
models (which match every header against fields and their synonyms), so the two can never
disagree about which column is the prompt."""

from __future__ import annotations

import re

_UNITS = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")  # "Length (s)", "Ratio (W:H)", "Duration [sec]"
_SEPARATORS = re.compile(r"[\s\-./:]+")


def normalize_name(text: object) -> str:
    """Units in parentheses or brackets dropped, lower case, spaces, hyphens, dots,
    slashes and colons as one ``_``."""
    name = _SEPARATORS.sub("_", _UNITS.sub(" ", str(text)).strip().lower())
    return re.sub(r"_+", "_", name).strip("_")
