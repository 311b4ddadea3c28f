"""Smooth request pacing: a burst-free leaky bucket plus a shared cooldown.

Guarantee: with ``rate`` r and ``margin`` m, :meth:`SmoothLimiter.acquire` returns at
most once per ``(1 + m) / r`` seconds, so any r + 1 consecutive starts span at least
``1 + m`` seconds: no sliding 1-second window ever holds more than r starts, even when
each start reaches the server up to ``m`` seconds late relative to the others.

A plain ``AsyncLimiter(r, 1)`` would allow a burst of r at once (the bucket starts
empty), which is exactly what a provider's sliding-window limiter answers with 429;
``AsyncLimiter(1, period)`` has capacity one, so the first start is immediate and
every later one is spaced by ``period``.

:meth:`cooldown` pauses every caller until a point in time (a 429's ``Retry-After``):
one throttled request slows the whole run, not only its own retry.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter


class SmoothLimiter:
    def __init__(self, rate: float | None, margin: float = 0.02) -> None:
        self.rate = rate
        self._bucket = AsyncLimiter(1, (1.0 + margin) / rate) if rate else None
        self._resume_at = 0.0

    def cooldown(self, seconds: float) -> None:
        """Start nothing for ``seconds`` from now (extends, never shortens, a cooldown)."""
        loop = asyncio.get_running_loop()
        self._resume_at = max(self._resume_at, loop.time() + seconds)

    @property
    def cooling(self) -> bool:
        return asyncio.get_running_loop().time() < self._resume_at

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._resume_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._bucket is not None:
                await self._bucket.acquire()
            # A 429 may have arrived while this caller waited for its slot.
            if loop.time() >= self._resume_at:
                return


def parse_rate(text: str) -> float | None:
    """``2``, ``2/s``, ``100/min``, ``5000/h`` → requests per second; ``0``/``none`` → unlimited."""
    raw = text.strip().lower().replace(" ", "")
    if raw in ("0", "none", "unlimited", "inf"):
        return None
    number, _, unit = raw.partition("/")
    seconds = {"": 1, "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hr": 3600, "hour": 3600}.get(unit)
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if seconds is None or not value > 0 or value == float("inf"):
        raise ValueError(f"invalid rate {text!r}: use e.g. 2, 2/s, 100/min or 5000/h")
    return value / seconds
