"""The night generator: a Hypothesis rule-based state machine over whole histories.

Each example is a history of nights against the scripted provider: input files appear,
grow, get edited, reordered and duplicated; runs of the real CLI with drawn options
meet drawn faults (kill -9 at a random moment, SIGINT once or twice, a file-size limit
that fills the "disk" under the ledger, the table and the downloads, a second run at the
same time) and a provider whose answers are drawn from every class the README's outcome
table names; then reruns, collects, the next night. :meth:`World.check` runs after every
step. A failing history shrinks to a short list of steps, printed with its seed.

:func:`simulate` runs histories until a time budget is spent (the CI profile, or a soak
with ``SIM_MINUTES``), each batch under its own seed, and returns the statistics and the
first failure.
"""

from __future__ import annotations

import random
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as use_seed
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, initialize, precondition, rule
from sim_harness import KNOWN_ISSUE_18, Provider, RunSpec, Stats, World

# Answer classes of the README's outcome table, as the fake's Fault specs.
SUBMIT_FAULTS = (
    "400", "403", "413", "422",  # definite rejections
    "500", "500,accept=1", "502,accept=1", "504", "504,accept=1", "408,accept=1",  # ambiguous statuses
    "slow,delay=1.6",  # a timeout after sending (--timeout 1): the provider still creates the task
    "drop", "drop_accepted",  # a connection reset after the body
    "code", "code,accept=1", "no_task_id,accept=1", "badjson,accept=1", "odd_task_id", "huge",  # odd 2xx
    "429", "429,retry_after=1", "503", "503,retry_after=1",  # retried
    "slow,delay=0.3",  # delays
    "dup_task_id",  # an id the provider gave before
    "echo_key", "echo_key_url", "code,accept=1,form=exact",  # the key echoed
    "404", "401", "402",  # the night stops
)
KEY_FORM_FAULTS = ("echo_key,form=lower", "echo_key,form=pct", "echo_key_url,form=upper", "code,form=lower")
QUERY_FAULTS = ("500,endpoint=query", "429,endpoint=query,retry_after=1", "drop,endpoint=query")
DOWNLOAD_FAULTS = ("drop,endpoint=download", "redirect,endpoint=download", "404,endpoint=download",
                   "slow,endpoint=download,delay=0.2", "gzip,endpoint=download",
                   "redirect_key,endpoint=download,form=exact", "redirect_key,endpoint=download,form=lower")
KNOWN_FAULTS = {"bad_url": ("bad_url,endpoint=query",),
                "key_forms": KEY_FORM_FAULTS}
FORMATS = ("csv", "parquet", "xlsx")
SIGNAL_FAULTS = ("kill9", "sigint", "sigint2")


@dataclass
class Context:
    provider: Provider
    base: Path
    stats: Stats
    features: frozenset[str] = frozenset()
    env: dict[str, str] = field(default_factory=dict)
    focus: tuple[str, ...] = ()  # fault specs every night's mix includes (mutant tests)
    run_faults: tuple[str, ...] = ("none", "none", "kill9", "sigint", "sigint2", "fsize", "concurrent")
    aliases: tuple[str, ...] = ("plain", "symlink", "relative")
    options: dict[str, Any] = field(default_factory=dict)  # RunSpec fields every run gets (a focused scenario)
    serial: int = 0
    deadline: float = float("inf")  # time.monotonic(): past it, every step is a no-op (the budget)

    def over(self) -> bool:
        return time.monotonic() > self.deadline


def fault_mix(ctx: Context) -> st.SearchStrategy[list[str]]:
    kinds = list(SUBMIT_FAULTS)
    for feature, specs in KNOWN_FAULTS.items():
        if feature in ctx.features and feature in ("key_forms",):
            kinds += specs
    probs = st.sampled_from((0.05, 0.15, 0.3))
    one = st.tuples(st.sampled_from(kinds), probs).map(lambda kp: f"{kp[0]},prob={kp[1]}")
    return st.lists(one, max_size=4).map(lambda mix: [*ctx.focus, *mix])


def collect_mix(ctx: Context) -> st.SearchStrategy[list[str]]:
    kinds = list(QUERY_FAULTS + DOWNLOAD_FAULTS)
    for feature in ("bad_url",):
        if feature in ctx.features:
            kinds += KNOWN_FAULTS[feature]
    one = st.tuples(st.sampled_from(kinds), st.sampled_from((0.2, 0.5))).map(lambda kp: f"{kp[0]},prob={kp[1]}")
    return st.lists(one, max_size=3).map(lambda mix: [*ctx.focus, *mix])


def run_specs(ctx: Context) -> st.SearchStrategy[RunSpec]:
    return st.builds(
        RunSpec,
        rate=st.sampled_from(("0", "0", "20/s", "5/s")),
        concurrency=st.sampled_from((None, 1, 4, 16)),
        max_spend=st.one_of(st.none(), st.none(), st.integers(0, 8).map(lambda k: k * 0.05 + 0.01)),
        deadline=st.sampled_from((None, None, None, "2s")),
        resend_unknown=st.sampled_from((False, False, False, False, True)),
        wait=st.sampled_from((False, False, False, True)),
        alias=st.sampled_from(ctx.aliases),
        csv_out=st.booleans(),
        fault=st.sampled_from(ctx.run_faults),
        at=st.floats(0.0, 1.5),
        anchor=st.sampled_from(("first_post", "first_post", "start")),
        fsize=st.sampled_from((8192, 40000, 80000, 200000)),
    ).map(lambda spec: replace(spec, **ctx.options))


def machine(ctx: Context) -> type[RuleBasedStateMachine]:
    class Nights(RuleBasedStateMachine):
        world: World

        @initialize(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(FORMATS), n=st.integers(1, 8),
                    invalid=st.integers(0, 1), spec=run_specs(ctx), mix=fault_mix(ctx),
                    latency=st.sampled_from((0.0, 0.1, 0.4)), script_seed=st.integers(0, 2**16))
        def first_night(self, seed: int, fmt: str, n: int, invalid: int, spec: RunSpec, mix: list[str],
                        latency: float, script_seed: int) -> None:
            """A history starts with a file and the night's first run (the rules that follow
            are drawn: histories without a run would check nothing)."""
            if ctx.over():
                return
            ctx.serial += 1
            ctx.stats.histories += 1
            self.world = World(ctx.base / f"history{ctx.serial % 2}", ctx.provider, ctx.stats, random.Random(seed),
                               ctx.features, env_extra=dict(ctx.env))
            self.world.add_file(fmt, n, invalid)
            self._check()
            self.world.script(mix, latency, script_seed)
            self._check(self.world.submit(spec))

        def _check(self, runs: list[Any] | None = None) -> None:
            ctx.stats.steps += 1
            problems = self.world.check(runs)
            if problems:
                ctx.stats.violations.extend(problems)
                raise AssertionError("\n".join(problems) + f"\n(history files: {self.world.base})")

        @rule(fmt=st.sampled_from(FORMATS), n=st.integers(1, 6))
        def new_file(self, fmt: str, n: int) -> None:
            if ctx.over():
                return
            self.world.add_file(fmt, n)
            self._check()

        @rule(which=st.integers(0, 9), n=st.integers(1, 5), how=st.sampled_from(("append", "edit", "duplicate",
                                                                                  "reorder")))
        def change_file(self, which: int, n: int, how: str) -> None:
            if ctx.over():
                return
            names = sorted(self.world.files)
            name = names[which % len(names)]
            if how == "append":
                self.world.append(name, n)
            elif how == "edit":
                self.world.edit(name, n)
            elif how == "duplicate":
                self.world.duplicate(name, n)
            else:
                self.world.reorder(name)
            self._check()

        @rule(spec=run_specs(ctx), mix=fault_mix(ctx), latency=st.sampled_from((0.0, 0.1, 0.4)),
              seed=st.integers(0, 2**16))
        def submit(self, spec: RunSpec, mix: list[str], latency: float, seed: int) -> None:
            if ctx.over():
                return
            self.world.script(mix, latency, seed)
            self._check(self.world.submit(spec))

        @rule(mix=fault_mix(ctx), seed=st.integers(0, 2**16), alias=st.sampled_from(ctx.aliases),
              resend=st.sampled_from((False, False, True)))
        def rerun(self, mix: list[str], seed: int, alias: str, resend: bool) -> None:
            """The morning's rerun after whatever happened: same night, no fault of ours."""
            if ctx.over():
                return
            self.world.script(mix, 0.0, seed)
            last = self.world.runs[-1].spec if self.world.runs else RunSpec()
            self._check(self.world.submit(replace(last, fault="none", alias=alias, resend_unknown=resend, wait=False)))

        @rule(alias=st.sampled_from(("plain", "symlink", "relative")), mix=collect_mix(ctx), seed=st.integers(0, 2**16),
              task_delay=st.sampled_from((0.0, 0.0, 3.0, 3600.0)))
        @precondition(lambda self: not ctx.over() and self.world.output().exists())
        def collect(self, alias: str, mix: list[str], seed: int, task_delay: float) -> None:
            """The morning's collect; tasks done, still moving (3 s) or stalled (an hour)."""
            if ctx.over():
                return
            self.world.script(mix, 0.0, seed, task_delay)
            self._check([self.world.collect(alias)])

        @rule()
        def next_night(self) -> None:
            if ctx.over():
                return
            self.world.night += 1
            self._check()

    return Nights


@dataclass
class Failure:
    seed: int
    message: str


def simulate(provider: Provider, base: Path, budget_s: float, *, seed: int | None = None, steps: int = 6,
             per_seed: int = 2, features: frozenset[str] = frozenset(), env: dict[str, str] | None = None,
             focus: tuple[str, ...] = (), shrink: bool = True, run_faults: tuple[str, ...] | None = None,
             aliases: tuple[str, ...] | None = None, max_seeds: int | None = None,
             options: dict[str, Any] | None = None) -> tuple[Stats, Failure | None]:
    """Histories until ``budget_s`` seconds pass (or one batch, with ``seed``); each batch of
    ``per_seed`` histories runs under its own Hypothesis seed, the replay handle."""
    stats = Stats()
    ctx = Context(provider, base, stats, features, dict(env or {}), focus, options=dict(options or {}))
    if run_faults is not None:
        ctx.run_faults = run_faults
    if aliases is not None:
        ctx.aliases = aliases
    elif "hardlink" in features:
        ctx.aliases = (*ctx.aliases, "hardlink", "hardlink")
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if shrink else (Phase.explicit, Phase.generate)
    config = settings(max_examples=per_seed, stateful_step_count=steps, deadline=None, database=None,
                      phases=phases, suppress_health_check=list(HealthCheck), print_blob=False)
    started = time.monotonic()
    if seed is None:
        ctx.deadline = started + budget_s
    seeds = [seed] if seed is not None else None
    picker = random.Random()
    failure = None
    n = 0
    while True:
        if seeds is not None:
            if not seeds:
                break
            this = seeds.pop()
        else:
            if time.monotonic() - started >= budget_s or (max_seeds is not None and n >= max_seeds):
                break
            this = picker.getrandbits(32)
        n += 1
        test = use_seed(this)(get_state_machine_test(machine(ctx), settings=config))
        try:
            test()
        except Exception as exc:
            # A timing fault (the moment of a kill) may not strike again when Hypothesis
            # replays the history: it then reports FlakyFailure, but what was seen stands.
            first = stats.violations[0] if stats.violations else "".join(traceback.format_exception_only(exc)).strip()
            notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", []))
            for inner in getattr(exc, "exceptions", ()):
                notes += "".join(f"\n{note}" for note in getattr(inner, "__notes__", []))
            failure = Failure(this, f"{first}\n({type(exc).__name__}){notes}")
            break
    stats.seconds = time.monotonic() - started
    if failure is None:
        shutil.rmtree(base, ignore_errors=True)
    return stats, failure


__all__ = ["KNOWN_ISSUE_18", "Failure", "simulate"]
