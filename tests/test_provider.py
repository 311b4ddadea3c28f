"""Meeting the provider as it is today (issue #12), over HTTP against the fake and small
servers written here: the preflight, the route forms, get_result, task states, the
rate-limit headers and concurrency-limit 429s."""

import json
import time
from pathlib import Path

import polars as pl
from aiohttp import web
from conftest import cli, error_line, json_lines, prompts, results, write_csv

LITE = "bytedance/seedance-1.0-lite-t2v"


def submit(url: str, tmp_path: Path, path: Path, *extra: str, out: str = "r.parquet"):
    return cli(["submit", str(path), "-o", str(tmp_path / out), "--base-url", url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


def collect(url: str, tmp_path: Path, *extra: str):
    return cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", url, "--rate", "0",
                "--results", str(tmp_path / "r.parquet"), *extra])


# -- 3. the preflight ---------------------------------------------------------------------------

def test_an_invalid_key_stops_before_anything_is_sent(start_fake, tmp_path: Path) -> None:
    fake = start_fake(api_key="the-real-key")
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(5)))
    assert res.exit_code == 5
    line = error_line(res.stderr)
    assert line.startswith("preflight: key: the provider says the key is not valid;") and "nothing sent" in line
    assert fake.state.submissions() == []


def test_a_model_the_provider_does_not_list_stops_before_anything_is_sent(start_fake, tmp_path: Path) -> None:
    fake = start_fake(models=("bytedance/seedance-1.5-pro-t2v",))
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(5)))
    assert res.exit_code == 5
    assert f"models: {LITE} is not listed (1 models listed)" in error_line(res.stderr)
    assert fake.state.submissions() == []


def test_a_zero_balance_stops_and_a_short_one_warns(start_fake, tmp_path: Path) -> None:
    fake = start_fake(balance=0.0)
    path = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}", "duration": "10"} for i in range(10)])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 5 and "balance: the balance is 0.00 USD" in error_line(res.stderr)
    assert fake.state.submissions() == []
    fake.state.config.balance = 0.5
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{LITE}"]\n"720p" = 0.02\n')  # 10 x 10 s x 0.01 (flex) = 1.00 USD
    res = submit(fake.url, tmp_path, path, "--prices", str(prices))
    assert res.exit_code == 0, res.output
    warning = next(e for e in json_lines(res.stderr) if e.get("check") == "balance")
    assert warning["outcome"] == "warn" and "0.50 USD will not cover tonight's estimate of 1.00 USD" in warning["detail"]


def test_a_host_without_the_preflight_endpoints_is_a_warning_not_a_stop(serve, tmp_path: Path) -> None:
    app = web.Application()
    seen: list[str] = []

    async def post(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"code": 0, "data": {"task_id": f"t{len(seen)}"}})

    app.router.add_post("/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async", post)
    url = serve(app)
    res = submit(url, tmp_path, write_csv(tmp_path / "in.csv", prompts(3)))
    assert res.exit_code == 0, res.output
    assert len(seen) == 3
    checks = {e["check"]: e for e in json_lines(res.stderr) if e.get("event") == "preflight"}
    assert {c["outcome"] for c in checks.values()} == {"warn"} and "HTTP 404" in checks["key"]["detail"]


def test_check_prints_one_line_per_check_and_exits_for_cron(start_fake, tmp_path: Path) -> None:
    fake = start_fake(balance=12.5, models=(LITE,))
    res = cli(["check", "--base-url", fake.url])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["ok    key      valid", f"ok    models   {LITE} listed and active",
                                       "ok    balance  12.50 USD"]
    fake.state.config.api_key = "another"
    res = cli(["check", "--base-url", fake.url])
    assert res.exit_code == 5 and res.stdout.startswith("FAIL  key")
    assert fake.state.submissions() == []
    job = tmp_path / "job.toml"
    write_csv(tmp_path / "in.csv", [{"prompt": "p", "model": "bytedance/seedance-1.5-pro-t2v"}])
    job.write_text(f'inputs = ["in.csv"]\nbase_url = "{fake.url}"\n')
    fake.state.config.api_key = None
    res = cli(["check", str(job)])
    assert res.exit_code == 5 and "bytedance/seedance-1.5-pro-t2v is not listed" in res.output


def test_no_preflight_skips_the_checks(start_fake, tmp_path: Path) -> None:
    fake = start_fake(api_key="the-real-key")
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(3)), "--no-preflight", "--concurrency", "1")
    assert res.exit_code == 5 and "stop reason: HTTP 401" in res.output
    assert [r.kind for r in fake.state.records] == ["submit"]


# -- 1. the endpoint is configuration --------------------------------------------------------------

def test_route_forms_and_templates_reach_their_routes_and_are_recorded(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(2))
    for n, (endpoint, route) in enumerate([
        ("seed", f"/api/v1/text-to-video/{LITE}/async"), ("async", f"/api/v1/{LITE}/async"),
        ("v1", f"/api/v1/{LITE}"), ("{base}/api/v1/{provider}/{model}/async", f"/api/v1/{LITE}/async"),
    ]):
        state = f"s{n}.sqlite"
        res = cli(["submit", str(path), "-o", str(tmp_path / f"r{n}.parquet"), "--base-url", fake.url,
                   "--state", str(tmp_path / state), "--rate", "0", "--endpoint", endpoint])
        assert res.exit_code == 0, res.output
        assert [r.path for r in fake.state.submissions()[-2:]] == [route, route]
        df = results(tmp_path / f"r{n}.parquet")
        assert df["endpoint"].to_list() == [fake.url + route] * 2 and df["model"].to_list() == [LITE] * 2
    res = cli(["submit", str(path), "-o", str(tmp_path / "x.parquet"), "--base-url", fake.url,
               "--endpoint", "https://elsewhere.example/api/v1/{provider}/{model}"])
    assert res.exit_code == 2 and "not at the API base" in error_line(res.stderr)


def test_polls_follow_get_result_only_on_the_apis_own_host(serve, tmp_path: Path) -> None:
    seen: list[str] = []
    app = web.Application()

    async def post(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        tid = f"t-{prompt}"
        target = f"http://{request.host}/v2/result/{tid}" if prompt == "ours" else f"http://127.0.0.2:9/steal/{tid}"
        return web.json_response({"code": 0, "data": {"task_id": tid, "get_result": {"method": "GET", "url": target}}})

    async def get(request: web.Request) -> web.Response:
        seen.append(request.path)
        tid = request.path.rsplit("/", 1)[1]
        return web.json_response({"code": 0, "data": {"status": "pending", "task_id": tid}})

    app.router.add_post("/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async", post)
    app.router.add_get("/v2/result/{tid}", get)
    app.router.add_get("/api/v1/tasks/{tid}", get)
    url = serve(app)
    submit(url, tmp_path, write_csv(tmp_path / "in.csv", [{"prompt": "ours"}, {"prompt": "theirs"}]))
    collect(url, tmp_path)
    assert sorted(seen) == ["/api/v1/tasks/t-theirs", "/v2/result/t-ours"]


# -- 2. task states and reasons ------------------------------------------------------------------

def test_task_states_processing_cancelled_and_reasons(start_fake, tmp_path: Path) -> None:
    fake = start_fake(task_delay=1.0)
    submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", [{"prompt": "fine"}, {"prompt": "CANCELTASK now"},
                                                               {"prompt": "FAILTASK now"}]))
    time.sleep(0.6)
    collect(fake.url, tmp_path)
    assert results(tmp_path / "r.parquet")["task_status"].to_list() == ["processing"] * 3
    time.sleep(0.6)
    res = collect(fake.url, tmp_path)
    df = results(tmp_path / "r.parquet")
    assert df["task_status"].to_list() == ["success", "failed", "failed"]
    assert df["failure_reason"].to_list()[1:] == ["cancelled: 499: Cancelled: the task was cancelled",
                                                 "400: Content Moderation: the prompt was rejected"]
    assert res.exit_code == 1


def test_an_unknown_task_state_is_logged_once_and_kept_open(serve, tmp_path: Path) -> None:
    app = web.Application()

    ids = iter(range(1000))

    async def post(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"code": 0, "data": {"task_id": f"t{next(ids)}"}})

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"code": 0, "data": {"status": "paused", "task_id": request.match_info["tid"]}})

    app.router.add_post("/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async", post)
    app.router.add_get("/api/v1/tasks/{tid}", get)
    url = serve(app)
    submit(url, tmp_path, write_csv(tmp_path / "in.csv", prompts(3)))
    res = collect(url, tmp_path)
    assert res.exit_code == 1
    assert [e["state"] for e in json_lines(res.stderr) if e["event"] == "task_state_unknown"] == ["paused"]
    assert results(tmp_path / "r.parquet")["task_status"].to_list() == ["pending"] * 3


# -- 2. rate-limit headers and concurrency limits ------------------------------------------------

def test_x_ratelimit_remaining_slows_the_run_before_the_provider_says_429(start_fake, tmp_path: Path) -> None:
    for form in ("delta", "epoch"):
        fake = start_fake(minute_limit=10, window_s=2.0, reset_form=form)
        path = write_csv(tmp_path / f"{form}.csv", prompts(24, form))
        t0 = time.monotonic()
        res = cli(["submit", str(path), "-o", str(tmp_path / f"{form}.parquet"), "--base-url", fake.url,
                   "--state", str(tmp_path / f"{form}.sqlite"), "--rate", "0", "--concurrency", "2",
                   "--no-preflight"])
        assert res.exit_code == 0, res.output
        refused = sum(1 for r in fake.state.records if r.status == 429)
        # At most what was in flight when the window closed, and one at its edge; without the
        # slow-down every request past the 10th of a window meets a 429 until it reopens.
        assert refused <= 4, f"{form}: {refused} x 429"
        assert time.monotonic() - t0 >= 2.0  # 24 requests need a third window
        assert results(tmp_path / f"{form}.parquet")["status"].to_list() == ["submitted"] * 24


def test_429s_from_a_concurrency_limit_shrink_what_is_in_flight(start_fake, tmp_path: Path) -> None:
    fake = start_fake(max_concurrent=3, latency=0.2)
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(40)), "--concurrency", "24",
                 "--max-attempts", "30", "--no-preflight")
    assert res.exit_code == 0, res.output
    refused = sum(1 for r in fake.state.records if r.status == 429)
    accepted = len(fake.state.accepted_bodies())
    assert accepted == 40 and refused < 40, refused  # without AIMD every round of 24 loses 21
    assert results(tmp_path / "r.parquet")["status"].to_list() == ["submitted"] * 40


def test_the_fake_answers_in_todays_dialect(fake, tmp_path: Path) -> None:
    import urllib.request

    def get(path: str) -> dict:
        req = urllib.request.Request(fake.url + path, headers={"Authorization": "Bearer k"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    assert get("/api/v1/apikey/validate")["data"] == {"is_valid": True}
    assert get("/api/v1/team/balance")["data"]["balance"] == 100.0
    assert LITE in [m["slug"] for m in get("/api/v1/models")["data"]["models"]]
    submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(1)))
    tid = results(tmp_path / "r.parquet")["task_id"][0]
    assert get(f"/api/v1/tasks/{tid}")["data"]["status"] in ("success", "pending")
    assert pl.__version__
