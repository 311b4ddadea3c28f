"""The simulation suite's options and its one provider process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # sim_harness, simulate: helpers, not test modules

from sim_harness import Provider


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--replay", type=int, default=None, metavar="SEED",
                     help="tests/sim: rerun the histories of one seed a failure printed (no time budget)")


@pytest.fixture(scope="session")
def sim_provider() -> Iterator[Provider]:
    provider = Provider()
    try:
        yield provider
    finally:
        provider.close()
