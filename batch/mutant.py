"""Test-only switches that break one guarantee each, so that tests/sim can show its
checks fail when the tool is wrong (a checker that cannot fail proves nothing).

Inert unless the environment sets ``SEEDANCE_BATCH_MUTANT`` to a switch's name; each
switch is read in exactly one place in the tool (grep for its name). Never set it in
production: every switch either pays twice, loses a task or leaks the key.
"""

from __future__ import annotations

import os

NAMES = ("mark_after_send", "skip_claim_fsync", "treat_500_as_rejection", "drop_key_scrub")


_ON = os.environ.get("SEEDANCE_BATCH_MUTANT")  # read once: some switches sit on the per-request path


def mutant(name: str) -> bool:
    """Whether the test-only switch ``name`` is on (see the module docstring)."""
    return name == _ON
