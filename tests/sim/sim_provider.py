"""The simulation's provider: the bundled fake API (``batch.fake_api``) in a process of
its own, so that it outlives every crash of the tool, driven by a seeded script.

Run as ``python sim_provider.py``: it prints its port, then serves on 127.0.0.1 until
its standard input closes. Two control routes besides the fake's own:

* ``POST /_sim/configure`` ``{"seed", "faults": [Fault specs], "latency", "jitter",
  "task_delay"}``: tonight's answer mix, drawn from ``seed`` (the fake's ``Fault``
  mechanism picks one per request, in order, each with its probability).
* ``GET /_sim/records?since=N``: the ground truth, every request the provider received
  (for a POST: its body and whether it created a task), once no handler is running.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from aiohttp import web

from batch.fake_api import STATE_KEY, FakeConfig, Fault, make_app, start_app


def build() -> web.Application:
    config = FakeConfig()
    app = make_app(config)
    state = app[STATE_KEY]

    async def configure(request: web.Request) -> web.Response:
        spec = await request.json()
        config.faults = [Fault.parse(f) for f in spec.get("faults", [])]
        config.latency = float(spec.get("latency", 0.0))
        config.jitter = float(spec.get("jitter", 0.0))
        config.task_delay = float(spec.get("task_delay", 0.0))
        state.rng = random.Random(spec.get("seed", 0))
        return web.json_response({"ok": True})

    async def records(request: web.Request) -> web.Response:
        # Quiet first: a handler still sleeping (the client timed out) may yet create a task.
        deadline = time.monotonic() + float(request.query.get("settle", 10))
        while state.active > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        since = int(request.query.get("since", 0))
        return web.json_response([{"i": since + n, **r.__dict__} for n, r in enumerate(state.records[since:])])

    app.router.add_post("/_sim/configure", configure)
    app.router.add_get("/_sim/records", records)
    return app


async def serve() -> None:
    runner, port = await start_app(build())
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the harness closes stdin (or dies)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
