"""What makes two requests the same video: the request identity.

Guarantee: the key of a request depends only on the model and the body fields that
shape the video (every field but ``service_tier`` and ``execution_expires_after``),
never on labels (the id column, the file name, the row, the sheet), so renaming ids,
changing ``id_column`` or re-exporting the same rows from ``.xlsx`` instead of ``.csv``
finds the same ledger entries and pays for nothing twice. Identical requests in one
run are told apart by their repeat count (``<key>``, ``<key>-1``, ``<key>-2`` ...):
each is its own paid video, on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Fields that change how or how long a task runs, not which video it makes: a rerun
# with another tier must not pay again for the same video, so they are not identity.
NON_IDENTITY_FIELDS = frozenset({"service_tier", "execution_expires_after"})

# One encoder reused: json.dumps() builds a new one per call when given options.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_key(model: str, body: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the model and the identity fields of ``body``."""
    identity = {k: v for k, v in body.items() if k not in NON_IDENTITY_FIELDS}
    text = model + "\n" + _CANONICAL.encode(identity)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_repeat(key: str, n: int) -> str:
    """The request id of the ``n``-th (0-based) identical request."""
    return key if n == 0 else f"{key}-{n}"
