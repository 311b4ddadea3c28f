"""Run progress: a rich progress bar on a TTY, a structured ``progress`` log event every
``interval`` seconds otherwise (cron). Exactly one of the two, never both.

The total is not known up front (requests stream out of the expansion), so it is
estimated from the share of input rows read so far, and exact once all are read.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog


class Progress:
    def __init__(self, rows_read: Callable[[], tuple[int, int]], tty: bool | None = None,
                 interval: float = 10.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.queued = 0
        self.producer_done = False
        self._rows_read = rows_read
        self._started = time.monotonic()
        self._log = structlog.get_logger("batch.progress")
        self._bar: Any = None
        self._task_id: Any = None

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def estimated_total(self) -> int:
        if self.producer_done:
            return self.queued
        seen, total = self._rows_read()
        if seen <= 0:
            return self.queued
        return max(self.queued, round(self.queued * total / seen))

    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if rate <= 0:
            return None
        return max(0.0, (self.estimated_total() - self.done) / rate)

    def snapshot(self) -> dict[str, Any]:
        eta = self.eta()
        return {"done": self.done, "total_estimate": self.estimated_total(), "counts": dict(self.counts),
                "rate_per_s": round(self.rate(), 2), "eta_s": None if eta is None else round(eta, 1)}

    async def run(self) -> None:
        """Report until cancelled."""
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("submitting"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._task_id = self._bar.add_task("submit", total=None, counts="", rate="")
            self._bar.start()
        try:
            while True:
                await asyncio.sleep(0.25 if self.tty else self.interval)
                self.report()
        finally:
            if self._bar is not None:
                self.report()
                self._bar.stop()

    def report(self) -> None:
        snap = self.snapshot()
        if self._bar is not None:
            counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            self._bar.update(self._task_id, completed=snap["done"], total=snap["total_estimate"] or None,
                             counts=counts, rate=f"{snap['rate_per_s']:.1f}/s")
        else:
            self._log.info("progress", **snap)
