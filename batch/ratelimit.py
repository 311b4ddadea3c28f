"""Smooth request pacing: a burst-free virtual schedule, a hard sliding-window guard,
and a shared cooldown; optionally shared by every process using the same API key.

Guarantee, for ``Rate(count, period)`` and ``margin`` m:

* starts are scheduled on an ideal timeline spaced ``period * (1 + m) / count`` apart; a
  caller that wakes late does not push the timeline back, so the achieved rate is the
  target (less m), however busy the event loop is;
* no start gets credit for idle time: the first request after a pause starts at once,
  the next one a full interval later (no initial burst);
* hard guard: no window of ``period * (1 + m/2)`` ever holds more than ``floor(count)``
  starts, measured on the actual start times. The scheduled spacing leaves another
  ``m/2`` of the period for starts to reach the server unevenly (network jitter);
* with a :class:`SharedBudget`, the timeline, the window and the cooldown are those of
  the *key*, not of the process: a 15-minute ``collect`` beside the nightly ``submit``
  takes its polls out of the same budget, so together they never send more than the
  per-key limit.

:meth:`~SmoothLimiter.acquire` is both steps. A caller with work between its turn and
the wire (the submitter commits its durable ``sending`` mark there, which an fsync can
stretch to 100 ms) calls :meth:`~SmoothLimiter.schedule` before that work and
:meth:`~SmoothLimiter.admit` right before sending, so the guard counts the moments
requests really leave: a stalled disk cannot release a bunch that the provider's own
window would count together.

Why not ``aiolimiter``: ``AsyncLimiter(count, period)`` lets a burst of ``count`` through
at once, exactly what a provider's sliding window answers with 429; with capacity 1
(``AsyncLimiter(1, period / count)``) every late wake-up is lost time. Measured with
``benchmarks/bench.py`` on the 2-core machine: 0.89 of the target at 100/s and 0.80 at
500/s, against 0.98 and 0.98 with this schedule.

Why a memory-mapped file under ``flock`` for the shared budget, rather than a broker
process or SQLite: each start is a few struct reads and writes inside a lock held for
microseconds (the kernel drops it if a process dies holding it); measured at 500/s with
benchmarks/bench.py, the shared budget costs ~4 µs per start. The clock is
``CLOCK_MONOTONIC``, which all processes of one boot share; the boot id in the file
resets a budget left by an earlier boot.

:meth:`SmoothLimiter.cooldown` pauses every caller until a point in time (a 429's
``Retry-After``): one throttled request slows the whole run, not only its own retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import math
import mmap
import os
import stat
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from batch.api import DOCUMENTED_RATE_PER_MIN


class Throttling(Protocol):
    """The parts of an API answer that speak of the rate budget (a client ``Verdict``)."""

    http_status: int | None
    retry_after: float | None
    rate_remaining: int | None
    rate_limit: int | None
    rate_reset: float | None


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period`` seconds, as the user wrote it (100/min stays per minute)."""

    count: float
    period: float = 1.0

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period, f"{self.period:g}s")
        return f"{self.count:g}/{unit}"


DEFAULT_RATE = Rate(DOCUMENTED_RATE_PER_MIN, 60.0)


class _LocalBudget:
    """The pacing state of one process."""

    def __init__(self, capacity: int) -> None:
        self.next = 0.0  # time of the next free slot on the ideal timeline
        self.resume_at = 0.0
        self.starts: deque[float] = deque(maxlen=max(1, capacity))

    @contextlib.contextmanager
    def locked(self) -> Iterator[_LocalBudget]:
        yield self

    def nth_last_start(self, n: int) -> float | None:
        return self.starts[-n] if len(self.starts) >= n else None

    def add_start(self, t: float) -> None:
        self.starts.append(t)


_MAGIC = b"SDBUDG02"
_HEAD = struct.Struct("<8s36sdd i i")  # magic, boot id, next, resume_at, count, head
_RING = 1 << 16  # starts remembered: enough for 65,536 per window
HORIZON = 3600.0  # a slot or a pause further ahead than this is damage


def _boot_id() -> bytes:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()[:36].ljust(36)
    except OSError:
        return b"unknown".ljust(36)


class SharedBudget:
    """The pacing state of one API key on this machine, in a file every process maps."""

    def __init__(self, directory: Path, key: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]  # names the key, cannot reveal it
        self.path = directory / f"budget-{digest}.bin"
        size = _HEAD.size + 8 * _RING
        # Resized below: never through a name planted here (a symlink or a second hard link
        # to another file would have that file truncated).
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(self._fd)
            raise OSError(errno.EPERM, f"{self.path} is not a file of its own ({st.st_nlink} names)")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            magic, boot, nxt, _resume, _count, _head = _HEAD.unpack_from(self._map, 0)
            now = time.monotonic()
            self._boot = _boot_id()
            # Another boot's monotonic times mean nothing now; a slot an hour ahead is damage.
            if magic != _MAGIC or boot != self._boot or not nxt <= now + HORIZON:
                self._map[:] = bytes(size)
                _HEAD.pack_into(self._map, 0, _MAGIC, self._boot, 0.0, 0.0, 0, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[_SharedView]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            view = _SharedView(self._map, self._boot)
            yield view
            view.store()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class _SharedView:
    """The budget file's fields while its lock is held."""

    def __init__(self, buf: mmap.mmap, boot: bytes) -> None:
        self._buf = buf
        self._boot = boot
        _m, _b, nxt, resume, count, head = _HEAD.unpack_from(buf, 0)
        # The file is data another process wrote: a time that is no finite number, or one
        # beyond the horizon, would make every waiter spin (NaN compares false) or stall.
        self._now = time.monotonic()
        self.next = nxt if math.isfinite(nxt) and nxt <= self._now + HORIZON else 0.0
        self.resume_at = resume if math.isfinite(resume) and resume <= self._now + HORIZON else 0.0
        self._count, self._head = min(max(count, 0), _RING), head % _RING

    def nth_last_start(self, n: int) -> float | None:
        if n > min(self._count, _RING):
            return None
        index = (self._head - n) % _RING
        start = struct.unpack_from("<d", self._buf, _HEAD.size + 8 * index)[0]
        # A start is recorded as "now": one not finite or ahead of now is damage, no start.
        return start if math.isfinite(start) and start <= self._now + 1.0 else None

    def add_start(self, t: float) -> None:
        struct.pack_into("<d", self._buf, _HEAD.size + 8 * self._head, t)
        self._head = (self._head + 1) % _RING
        self._count = min(self._count + 1, _RING)

    def store(self) -> None:
        _HEAD.pack_into(self._buf, 0, _MAGIC, self._boot, self.next, self.resume_at, self._count, self._head)


class SmoothLimiter:
    def __init__(self, rate: Rate | None, margin: float = 0.02, shared: SharedBudget | None = None) -> None:
        self.rate = rate
        self._capacity = min(_RING, max(1, math.floor(rate.count))) if rate is not None else 1
        self._state: _LocalBudget | SharedBudget = shared if shared is not None and rate is not None \
            else _LocalBudget(self._capacity)
        self._resume_local = 0.0  # cooldown when unpaced (no shared state needed)
        if rate is not None:
            self._interval = rate.period * (1.0 + margin) / rate.count
            self._window = rate.period * (1.0 + margin / 2)

    def cooldown(self, seconds: float) -> None:
        """Start nothing for ``seconds`` from now (extends, never shortens, a cooldown)."""
        until = time.monotonic() + seconds
        if self.rate is None:
            self._resume_local = max(self._resume_local, until)
            return
        with self._state.locked() as s:
            s.resume_at = max(s.resume_at, until)

    def heed(self, answer: Throttling) -> None:
        """What an answer says about the key's budget. A 429 with ``Retry-After`` says when
        the window reopens: every caller waits (a bare 429 is more likely the concurrency
        limit, which the submitter's in-flight ceiling handles). ``X-RateLimit-Remaining``
        running low spreads the rest of the window (:meth:`slow_down`)."""
        if answer.http_status == 429 and answer.retry_after is not None:
            self.cooldown(answer.retry_after)
        if answer.rate_remaining is not None and answer.rate_reset is not None:
            self.slow_down(answer.rate_remaining, answer.rate_limit, answer.rate_reset)

    def slow_down(self, remaining: int, limit: int | None, reset: float) -> None:
        """Spread what is left of the provider's window (``X-RateLimit-Remaining``) over the
        time until it resets, once it runs low, instead of meeting a 429 at its end."""
        if reset <= 0 or reset > 3600:
            return
        low = max(2, (limit or 0) // 20)
        if remaining <= 0:
            self.cooldown(reset)
        elif remaining <= low:
            self.cooldown(reset / (remaining + 1))

    async def acquire(self) -> None:
        """Wait for this caller's turn, then for room in the window (:meth:`schedule`, :meth:`admit`)."""
        await self.schedule()
        await self.admit()

    async def schedule(self) -> None:
        """Wait for this caller's slot on the ideal timeline, and out any cooldown."""
        while True:
            now = time.monotonic()
            if self.rate is None:
                if now >= self._resume_local:
                    return
                await asyncio.sleep(self._resume_local - now)
                continue
            with self._state.locked() as s:
                slot = max(s.next, now, s.resume_at)
                s.next = slot + self._interval
            if slot > now:
                await asyncio.sleep(slot - now)
            with self._state.locked() as s:
                if time.monotonic() >= s.resume_at:
                    return
            # a 429 arrived while this caller waited: take a new slot (after one turn of
            # the loop at least, so that a signal is always heard)
            await asyncio.sleep(0)

    def admit_now(self) -> bool:
        """Record a start now if the window has room (never waits)."""
        return self._wait_for_room() == 0.0

    def _wait_for_room(self) -> float:
        if self.rate is None:
            return 0.0
        with self._state.locked() as s:
            now = time.monotonic()
            oldest = s.nth_last_start(self._capacity)
            if oldest is not None and (wait := oldest + self._window - now) > 0:
                return wait
            s.add_start(now)
            return 0.0

    async def admit(self) -> None:
        """Wait until one more start keeps every window within the rate; record it as now."""
        while (wait := self._wait_for_room()) > 0:
            await asyncio.sleep(wait)


def parse_rate(text: str) -> Rate | None:
    """``2/s``, ``100/min``, ``5000/h``; ``0``/``none`` → unpaced. A number without a unit
    is refused: a forgotten ``/min`` must not mean sixty times the spend rate."""
    raw = text.strip().lower().replace(" ", "")
    if raw in ("0", "none", "unlimited", "inf"):
        return None
    number, slash, unit = raw.partition("/")
    seconds = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hr": 3600, "hour": 3600}.get(unit)
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not slash and value > 0:
        raise ValueError(f"rate {text!r} has no unit: write {number}/min or {number}/s")
    if seconds is None or not value > 0 or value == float("inf"):
        raise ValueError(f"invalid rate {text!r}: use e.g. 2/s, 100/min or 5000/h (0 for unpaced)")
    return Rate(value, float(seconds))
