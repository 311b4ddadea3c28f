"""The money promises over generated hostile nights (see simulate.py and sim_harness.py).

``python -m pytest tests/sim`` is the CI profile (a time budget of ``SIM_CI_SECONDS``,
default 20 s, for the open-ended run); ``SIM_MINUTES=30`` makes it a soak. A failure
prints its seed and steps: ``python -m pytest tests/sim -k nights --replay SEED`` reruns it
and shrinks it to a minimal history.
Every run prints one line ``SIM_REPORT {json}``: histories, steps, faults by kind,
answers by class, invariants checked, violations.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sim_harness import Provider, report
from simulate import simulate


def budget() -> float:
    minutes = os.environ.get("SIM_MINUTES")
    return float(minutes) * 60 if minutes else float(os.environ.get("SIM_CI_SECONDS", "20"))


def test_nights_keep_the_money_promises(sim_provider: Provider, tmp_path: Path, request: pytest.FixtureRequest,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    replay = request.config.getoption("--replay")
    # Shrinking re-runs real processes (up to Hypothesis' 5 minutes): a replay shrinks, CI
    # and soaks report the history as found unless SIM_SHRINK=1.
    shrink = replay is not None or bool(os.environ.get("SIM_SHRINK"))
    stats, failure = simulate(sim_provider, tmp_path / "sim", budget(), seed=replay, shrink=shrink)
    report(capsys, "nights", stats, failed_seed=failure.seed if failure else None)
    assert stats.histories > 0
    if failure is not None:
        pytest.fail(f"{failure.message}\n\nreplay: python -m pytest tests/sim -k nights --replay {failure.seed}",
                    pytrace=False)
