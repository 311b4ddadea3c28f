"""The night page in a real headless browser (Debian's chromium through chromedriver and
Selenium): the README demo's page, a hostile prompt, and 10,000 requests."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import SAMPLES, cli, results, write_csv

from batch.page import page_beside, render_page
from benchmarks.page_bench import synthetic_night

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, path: Path) -> None:
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.paintedMs"))


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def card_ids(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.id)")


def shown(driver: Any) -> str:
    return driver.find_element(By.ID, "shown").text


def choose(driver: Any, select_id: str, value: str) -> None:
    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def demo(tmp_path: Path) -> Path:
    """README's demo: submit the samples to the fake, collect with --download; the page
    is written beside the results table."""
    table = tmp_path / "results" / "demo.parquet"
    sub = cli(["submit", str(SAMPLES), "--fake-api", "--rate", "0", "-o", str(table)])
    assert sub.exit_code == 1, sub.output  # the samples' 7 broken rows
    col = cli(["collect", "--fake-api", "--results", str(table), "--download", str(tmp_path / "videos"),
               "--rate", "0"])
    assert col.exit_code == 0, col.output
    assert f"page: {page_beside(str(table))}" in col.output
    return table


def test_demo_page_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    table = demo(tmp_path)
    page = tmp_path / "results" / "demo.html"
    df = results(table)
    open_page(browser, page)
    assert console_errors(browser) == []
    browser.save_screenshot(str(tmp_path / "night.png"))  # the test's artifact (pytest keeps tmp_path)
    assert (tmp_path / "night.png").stat().st_size > 10_000

    # The night at a glance matches the table: states (the task's once there is one) and problems.
    states = Counter("success" if t == "success" else s for s, t in zip(df["status"], df["task_status"], strict=True))
    for state, n in states.items():
        assert browser.find_element(By.CSS_SELECTOR, f'[data-count="{state}"]').text == str(n)
    invalid = df.filter(pl.col("status") == "invalid")
    assert browser.find_element(By.ID, "problem-count").text == str(invalid.height) == "7"
    assert shown(browser) == f"{df.height} of {df.height} requests"
    # One card per request, in the table's order, with its prompt, task id and source row.
    assert card_ids(browser) == df["request_id"].to_list()
    first = df.row(0, named=True)
    card = browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{first["request_id"]}"]')
    assert first["prompt"] in card.text and first["task_id"] in card.text
    assert f"mixed-models.xlsx:Campaign!{first['row']}" in card.text or f"!{first['row']}" in card.text
    assert card.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg;base64,")

    # Failed and invalid rows in one click: the button in the glance.
    browser.find_element(By.ID, "problems").click()
    assert sorted(card_ids(browser)) == sorted(invalid["request_id"].to_list())
    assert shown(browser) == f"7 of {df.height} requests"
    bad = browser.find_element(By.CSS_SELECTOR, "#grid .card")
    assert "bad" in bad.get_attribute("class") and invalid["error"][0] in browser.find_element(By.ID, "grid").text

    # Filters: a model, then a source, then back to all and a text search.
    choose(browser, "f-status", "*")
    model = "bytedance/seedance-1.5-pro-t2v"
    choose(browser, "f-model", model)
    assert sorted(card_ids(browser)) == sorted(df.filter(pl.col("model") == model)["request_id"].to_list())
    choose(browser, "f-model", "*")
    choose(browser, "f-source", "prompts.csv")
    assert sorted(card_ids(browser)) == sorted(
        df.filter(pl.col("source").str.ends_with("prompts.csv"))["request_id"].to_list())
    choose(browser, "f-source", "*")
    search = browser.find_element(By.ID, "f-search")
    search.send_keys("LIGHTHOUSE")  # case-insensitive, over prompts (and ids, errors...)
    want = sorted(df.filter(pl.col("prompt").str.to_lowercase().str.contains("lighthouse"))["request_id"].to_list())
    assert want
    WebDriverWait(browser, 5).until(lambda d: sorted(card_ids(d)) == want)
    search.clear()
    search.send_keys(first["task_id"])
    WebDriverWait(browser, 5).until(lambda d: card_ids(d) == [first["request_id"]])
    search.clear()
    search.send_keys("mx-02")  # the sheet's own id column, shown on the card and searched
    mx02 = df.filter(pl.col("ID") == "mx-02")["request_id"].to_list()
    WebDriverWait(browser, 5).until(lambda d: card_ids(d) == mx02)
    assert "ID=mx-02" in browser.find_element(By.ID, "grid").text
    search.clear()
    search.send_keys(first["task_id"])
    WebDriverWait(browser, 5).until(lambda d: card_ids(d) == [first["request_id"]])

    # The video on click: a relative link to the downloaded file, played by the browser.
    poster = browser.find_element(By.CSS_SELECTOR, "#grid .card a.poster")
    href = poster.get_attribute("href")
    assert href == (tmp_path / "videos" / Path(first["local_paths"][0]).name).as_uri()
    assert not poster.get_dom_attribute("href").startswith(("/", "file:"))  # relative in the page
    poster.click()
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const v = document.querySelector('#grid video'); return v && v.readyState >= 2 && v.currentTime > 0"))
    assert browser.execute_script("return document.querySelector('#grid video').error") is None
    assert console_errors(browser) == []


def test_undecodable_video_gets_a_card_that_says_so(browser: Any, tmp_path: Path) -> None:
    table = demo(tmp_path)
    df = results(table)
    broken = df.filter(pl.col("local_paths").is_not_null()).row(0, named=True)
    Path(broken["local_paths"][0]).write_bytes(b"<html>an error page saved as a video</html>")
    night = tmp_path / "elsewhere" / "night.html"
    res = cli(["report", str(table), "--html", str(night)])
    assert res.exit_code == 0, res.output
    open_page(browser, night)
    card = browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{broken["request_id"]}"]')
    assert "video cannot be decoded" in card.text
    # The other cards keep their posters, linked relatively from the page's own directory.
    others = browser.find_elements(By.CSS_SELECTOR, ".card a.poster img")
    assert len(others) == df["local_paths"].drop_nulls().len() - 1
    assert console_errors(browser) == []


def test_a_script_in_a_prompt_is_text(browser: Any, tmp_path: Path, fake) -> None:
    evil = ('</script><script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
            '{{ 7*7 }} & "quotes" \u2028 end')
    inp = write_csv(tmp_path / "in.csv", [{"id": "evil", "prompt": evil, "campaign": "<b>bold</b>"},
                                          {"id": "ok", "prompt": "A calm lake"}])
    res = cli(["submit", str(inp), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--state",
               str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 0, res.output
    page = tmp_path / "night.html"
    assert cli(["report", str(tmp_path / "r.parquet"), "--html", str(page)]).exit_code == 0
    html = page.read_text(encoding="utf-8")
    assert "<script>window.pwned" not in html and "<img src=x" not in html
    open_page(browser, page)
    assert browser.execute_script("return window.pwned") is None
    prompts = browser.execute_script("return [...document.querySelectorAll('.card .prompt')].map(p => p.textContent)")
    assert evil in prompts
    assert console_errors(browser) == []


def test_ten_thousand_requests_render_in_under_two_seconds(browser: Any, tmp_path: Path) -> None:
    n = 10_000
    table = synthetic_night(tmp_path, n)
    started = time.perf_counter()
    html, info = render_page(str(table), str(tmp_path / "night.html"))
    build_s = time.perf_counter() - started
    page = tmp_path / "night.html"
    page.write_text(html, encoding="utf-8")
    df = pl.read_parquet(table)
    used = df["local_paths"].explode().drop_nulls().n_unique()
    assert info.requests == n and info.posters == used > 30 and info.poster_errors == 0  # one poster per video
    assert info.bytes < 6 * 1024 * 1024, info.bytes  # README states the measured size
    timings = []
    for _ in range(2):  # the first load also warms the browser's caches; both must be fast
        open_page(browser, page)
        timings.append(float(browser.execute_script("return document.body.dataset.paintedMs")))
    assert max(timings) < 2000, timings
    assert len(card_ids(browser)) == 60 and shown(browser) == f"{n} of {n} requests"
    problems = df.filter((pl.col("status") != "submitted") | (pl.col("task_status") == "failed")).height
    assert browser.find_element(By.ID, "problem-count").text == str(problems)
    # A search over all 10,000 rows answers while one waits.
    t0 = browser.execute_script("return performance.now()")
    browser.find_element(By.ID, "f-search").send_keys("variant 16")
    WebDriverWait(browser, 5).until(lambda d: shown(d).startswith(f"{sum(1 for i in range(n) if i % 17 == 16)} of"))
    search_ms = browser.execute_script("return performance.now()") - t0
    browser.find_element(By.ID, "next").click()
    assert len(card_ids(browser)) == 60
    assert console_errors(browser) == []
    print(json.dumps({"requests": n, "page_bytes": info.bytes, "build_s": round(build_s, 2),
                      "painted_ms": timings, "search_ms": round(search_ms)}))
    shutil.rmtree(tmp_path / "videos")  # the clips and posters: nothing worth keeping
