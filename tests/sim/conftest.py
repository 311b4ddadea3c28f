"""The simulation suite's options and its one provider process."""

from __future__ import annotations

import atexit
import collections
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

sys.path.insert(0, str(Path(__file__).parent))  # sim_harness, simulate: helpers, not test modules

from sim_harness import REPORTS, Provider

# Hypothesis keeps caches under the working directory (.hypothesis/, even with no example
# database): the suite must leave the work tree as it found it.
_HOME = tempfile.mkdtemp(prefix="sim-hypothesis-")
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, True)


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line of JSON for the whole session: what the simulations did and found."""
    if not REPORTS:
        return
    total: dict[str, object] = {"simulations": len(REPORTS)}
    for key in ("histories", "steps", "cli_runs", "seconds", "violations"):
        total[key] = round(sum(r[key] for r in REPORTS), 1)
    for key in ("faults", "provider_answers", "invariants_checked"):
        counter: collections.Counter[str] = collections.Counter()
        for r in REPORTS:
            counter.update(r[key])
        total[key] = dict(sorted(counter.items()))
    mutants = [r for r in REPORTS if str(r["test"]).startswith("mutant ")]
    total["mutants_caught"] = f"{sum(1 for r in mutants if r.get('caught'))}/{len(mutants)}"
    nights = [r for r in REPORTS if r["test"] == "nights"]
    total["violations_in_nights"] = sum(r["violations"] for r in nights)
    terminalreporter.write_line("SIM_REPORT_TOTAL " + json.dumps(total))
