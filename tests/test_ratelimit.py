import asyncio

import pytest

from batch.ratelimit import Rate, SmoothLimiter, parse_rate


@pytest.mark.parametrize(("text", "rate"), [
    ("2/s", Rate(2, 1)), ("100/min", Rate(100, 60)), ("5000/h", Rate(5000, 3600)),
    ("0.5/s", Rate(0.5, 1)), (" 10 / m ", Rate(10, 60)),
])
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "-1", "2/day", "", "inf/s", "1/0"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["100", "2", "0.5", " 100 "])
def test_a_rate_without_unit_is_refused_not_read_as_per_second(text: str) -> None:
    # "--rate 100" meant per minute by the provider's docs would be 60x the spend rate.
    with pytest.raises(ValueError, match=r"no unit: write .*/min or .*/s"):
        parse_rate(text)


def test_unpaced() -> None:
    assert parse_rate("0") is None and parse_rate("none") is None


def starts(limiter: SmoothLimiter, n: int, callers: int = 8) -> list[float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        it = iter(range(n))

        async def caller() -> None:
            for _ in it:
                await limiter.acquire()
                times.append(loop.time())

        await asyncio.gather(*(caller() for _ in range(callers)))
        return times

    return asyncio.run(main())


def test_no_initial_burst_and_no_window_over_the_rate() -> None:
    times = starts(SmoothLimiter(Rate(50, 1)), 60)
    assert len(times) == 60
    t0 = times[0]
    assert sum(1 for t in times if t < t0 + 0.1) <= 6  # a bucket would let 50 through at once
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 50
    achieved = (len(times) - 1) / (times[-1] - t0)
    assert 0.95 * 50 <= achieved <= 50


def test_cooldown_pauses_every_caller() -> None:
    async def main() -> tuple[float, float]:
        limiter = SmoothLimiter(Rate(1000, 1))
        loop = asyncio.get_running_loop()
        await limiter.acquire()
        limiter.cooldown(0.3)
        t0 = loop.time()
        await asyncio.gather(limiter.acquire(), limiter.acquire())
        return t0, loop.time()

    t0, t1 = asyncio.run(main())
    assert t1 - t0 >= 0.29


def test_rate_str() -> None:
    assert str(Rate(100, 60)) == "100/min" and str(Rate(2, 1)) == "2/s"


def test_window_counts_admissions_even_when_work_between_stalls() -> None:
    """A caller stalls between its turn and the wire (an fsync spike): the guard must count
    when requests really leave, so that the stalled ones cannot go out in a bunch."""
    rate = Rate(10, 1)
    limiter = SmoothLimiter(rate)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        sent: list[float] = []
        it = iter(range(40))

        async def caller(k: int) -> None:
            for i in it:
                await limiter.schedule()
                if i < 8:  # the first eight stall into the next second's turns
                    await asyncio.sleep(0.8)
                await limiter.admit()
                sent.append(loop.time())

        await asyncio.gather(*(caller(k) for k in range(8)))
        return sent

    sent = sorted(asyncio.run(main()))
    assert len(sent) == 40
    window = rate.period * 1.01
    assert max(sum(1 for u in sent if t <= u < t + window) for t in sent) <= 10
