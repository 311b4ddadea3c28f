"""A checker that cannot fail proves nothing: each mutant breaks one guarantee of the tool
(``SEEDANCE_BATCH_MUTANT``, see batch/mutant.py) and the simulator must catch it within
the CI budget. Each runs the same night generator, with the night's answer mix weighted
toward the classes its guarantee concerns (``focus``), the scenario and the fault that
expose it; no shrinking (a caught mutant needs no minimal history).

``test_known_issue_18`` (``SIM_KNOWN=1``) runs each scenario issue 18 found, focused: all
are fixed and part of every generated night; a scenario listed in
``sim_harness.KNOWN_ISSUE_18`` is left out of the nights and expected to fail here (xfail).
``test_pending_fix`` (``SIM_PENDING=1``) does the same for the answer classes whose fixes
are on other branches (``sim_harness.PENDING_FIXES``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sim_harness import FEATURES, KNOWN_ISSUE_18, PENDING_FIXES, Provider, report
from simulate import simulate

# A caught mutant stops at once (3-12 s on a quiet machine); the budget is for a loaded one: at a
# load average of 8-10, 20 s ran only 3 histories and spend_cap_per_run survived (caught in 45 s alone).
MUTANT_SECONDS = float(os.environ.get("SIM_MUTANT_SECONDS", "45"))
KNOWN_SECONDS = float(os.environ.get("SIM_KNOWN_SECONDS", "20"))
SENDS = {"max_spend": None, "deadline": None}  # runs that send


@dataclass(frozen=True)
class Exposure:
    """What a mutant's nights are weighted toward."""

    focus: tuple[str, ...] = ()  # answer classes always in the night's mix
    run_faults: tuple[str, ...] = ("none",)  # the run faults drawn from
    features: frozenset[str] = frozenset()  # the scenarios on (none: the base mix only)
    options: dict[str, Any] = field(default_factory=lambda: dict(SENDS))  # RunSpec fields of every run
    aliases: tuple[str, ...] | None = None
    own_tables: float = 0.5


MUTANTS = {
    "mark_after_send": Exposure(("slow,delay=0.8,prob=0.9",), ("kill9",)),
    "treat_500_as_rejection": Exposure(("500,accept=1,prob=0.7",)),
    "drop_key_scrub": Exposure(("echo_key_url,prob=0.7",)),
    # caught as the night's table read back as prompts: its rows in the next table, or a run refused
    "forget_own_tables": Exposure(features=frozenset({"own_tables"}), own_tables=1.0),
    # caught as a second run of the night spending its own cap again (4 accepted at 0.11)
    "spend_cap_per_run": Exposure(features=frozenset({"spend_per_night"}),
                                  options={"max_spend": 0.11, "concurrency": 1, "deadline": None}),
    # caught as kill -9 mid-send, then a rerun through the other name paying again
    # (a paced run, killed after its first answers; every later run goes through the second name)
    "skip_check_links": Exposure(("slow,delay=0.3,prob=0.3",), ("kill9",), frozenset({"hardlink"}),
                                 {"rate": "5/s", "max_spend": None, "deadline": None}, aliases=("hardlink",)),
}


# skip_check_links needs a kill -9 to land mid-send AND a rerun through the second name within the
# budget: caught in 3 of 4 CI-profile runs on this machine, survived 9 histories once (CI run of
# 2026-12-06). Until a focused exposure catches it every time, it may not fail the suite.
FLAKY = {"skip_check_links": "caught in 3 of 4 CI-profile runs; survived 9 histories once (needs a kill -9 mid-send)"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=False, reason=FLAKY[n]))
                                  if n in FLAKY else n for n in sorted(MUTANTS)])
def test_the_simulator_catches_the_mutant(name: str, sim_provider: Provider, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    how = MUTANTS[name]
    seconds = min(MUTANT_SECONDS, 20) if name in FLAKY else MUTANT_SECONDS  # a flaky one may not cost 45 s
    stats, failure = simulate(sim_provider, tmp_path / "sim", seconds, env={"SEEDANCE_BATCH_MUTANT": name},
                              focus=how.focus, run_faults=how.run_faults, shrink=False, per_seed=3, steps=5,
                              features=how.features, options=how.options, aliases=how.aliases,
                              own_tables=how.own_tables)
    report(capsys, f"mutant {name}", stats, caught=failure is not None,
           by=failure.message.splitlines()[0][:160] if failure else None)
    assert failure is not None, f"mutant {name} survived {stats.histories} histories"


@pytest.mark.xfail(strict=False, run=False, reason=(
    "a kill -9 cannot tell a skipped fsync from a done one: the WAL survives the process. It needs a "
    "power-cut simulation (a file system that drops unsynced writes, e.g. LazyFS), which this machine lacks"))
def test_the_simulator_catches_a_claim_without_fsync() -> None:
    raise AssertionError("not catchable here: see the xfail reason")


# The scenario, focused: (answer classes always in the mix, run faults, RunSpec fields, the share of own tables)
FOCUSED: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None, dict[str, Any] | None, float]] = {
    "own_tables": ((), None, None, 1.0),
    "spend_per_night": ((), ("kill9", "none"), {"max_spend": 0.11, "concurrency": 1}, 0.5),
    "hardlink": (("slow,delay=0.8,prob=0.5",), ("kill9", "none"), None, 0.5),
    "bad_url": (("bad_url,endpoint=query,prob=0.5",), None, None, 0.5),
    "key_forms": (("echo_key,form=lower,prob=0.3",), None, None, 0.5),
    "surrogate": (("surrogate,accept=1,prob=0.3", "surrogate,endpoint=query,prob=0.5"), None, None, 0.5),
    "key_b64": (("code,accept=1,form=b64,prob=0.3", "echo_key_url,form=b64,prob=0.3"), None, None, 0.5),
    "key_hex": (("code,accept=1,form=hex,prob=0.3", "echo_key_url,form=hex,prob=0.3"), None, None, 0.5),
}


def _focused(feature: str, provider: Provider, base: Path, request: pytest.FixtureRequest, capsys: Any,
             label: str) -> None:
    focus, faults, options, own = FOCUSED[feature]
    replay = request.config.getoption("--replay")
    aliases = ("plain", "hardlink") if feature == "hardlink" else None
    stats, failure = simulate(provider, base, KNOWN_SECONDS, features=frozenset({feature}), focus=focus,
                              run_faults=faults, shrink=replay is not None, per_seed=3, steps=6, seed=replay,
                              options=options, aliases=aliases, own_tables=own)
    report(capsys, f"{label} {feature}", stats, failed_seed=failure.seed if failure else None,
           by=failure.message.splitlines()[0][:200] if failure else None)
    assert failure is None, (f"{failure.message}\nreplay: SIM_KNOWN=1 SIM_PENDING=1 python -m pytest tests/sim "
                             f"-k '{feature}' --runxfail --replay {failure.seed}")


@pytest.mark.skipif(not os.environ.get("SIM_KNOWN"), reason="set SIM_KNOWN=1 to run the issue-18 scenarios focused "
                    "(each is also part of every generated night)")
@pytest.mark.parametrize("feature", [pytest.param(f, marks=[pytest.mark.xfail(strict=False, reason=KNOWN_ISSUE_18[f])]
                                                  if f in KNOWN_ISSUE_18 else []) for f in sorted(FEATURES)])
def test_known_issue_18(feature: str, sim_provider: Provider, tmp_path: Path, request: pytest.FixtureRequest,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _focused(feature, sim_provider, tmp_path / "sim", request, capsys, "known")


@pytest.mark.skipif(not os.environ.get("SIM_PENDING"), reason="set SIM_PENDING=1 to run the answer classes whose "
                    "fixes are not merged yet")
@pytest.mark.parametrize("feature", [pytest.param(f, marks=pytest.mark.xfail(strict=False, reason=why))
                                     for f, why in sorted(PENDING_FIXES.items())])
def test_pending_fix(feature: str, sim_provider: Provider, tmp_path: Path, request: pytest.FixtureRequest,
                     capsys: pytest.CaptureFixture[str]) -> None:
    _focused(feature, sim_provider, tmp_path / "sim", request, capsys, "pending")
