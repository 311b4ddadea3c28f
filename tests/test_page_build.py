"""The night page without a browser: where it is written, what it says, and what it survives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
from conftest import cli, prompts, results, submit_args, write_csv

from batch.page import render_page


def cards_of(html: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="rows">(.*?)</script>', html, re.S)
    assert match is not None
    return json.loads(match.group(1))


def collect_args(fake, tmp_path: Path, table: str = "results.parquet") -> list[str]:
    return ["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
            "--results", str(tmp_path / table), "--download", str(tmp_path / "videos")]


def test_submit_wait_download_writes_the_page_and_no_html_does_not(fake, tmp_path: Path) -> None:
    inp = write_csv(tmp_path / "in.csv", prompts(3))
    res = cli(submit_args(fake, tmp_path, inp, extra=["--wait", "--download", str(tmp_path / "videos")]))
    assert res.exit_code == 0, res.output
    page = tmp_path / "results.html"
    assert f"page: {page}" in res.output
    cards = cards_of(page.read_text(encoding="utf-8"))
    assert [c["st"] for c in cards] == ["success"] * 3
    assert all(c["v"].startswith("videos/") and c["po"].startswith("data:image/jpeg;base64,") for c in cards)
    page.unlink()
    res = cli([*collect_args(fake, tmp_path), "--no-html"])
    assert res.exit_code == 0 and not page.exists() and "page:" not in res.output


def test_csv_results_with_prices_spend_per_model_and_tier(fake, tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "one", "resolution": "720p", "duration": "5"},
            {"id": "b", "prompt": "two", "resolution": "480p", "duration": "10", "service_tier": "default"},
            {"id": "c", "prompt": "three", "duration": "15"}]  # invalid: never paid
    inp = write_csv(tmp_path / "in.csv", rows)
    assert cli(submit_args(fake, tmp_path, inp, out="results.csv")).exit_code == 1
    assert cli(collect_args(fake, tmp_path, "results.csv")).exit_code == 0
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.01\n"720p" = 0.02\n"1080p" = 0.04\n')
    night = tmp_path / "site" / "night.html"
    res = cli(["report", str(tmp_path / "results.csv"), "--html", str(night), "--prices", str(prices)])
    assert res.exit_code == 0, res.output
    html = night.read_text(encoding="utf-8")
    # flex (the default tier) at half price: 5 s x 0.02 / 2; default tier: 10 s x 0.01.
    assert re.search(r"<td>flex</td><td class=\"n\">1</td><td class=\"n\">5.0</td><td class=\"n\">0.05</td>", html)
    assert re.search(r"<td>default</td><td class=\"n\">1</td><td class=\"n\">10.0</td><td class=\"n\">0.10</td>", html)
    assert '<td class="n" id="spend-total">0.15</td>' in html
    cards = {c["id"]: c for c in cards_of(html)}
    df = results(tmp_path / "results.csv")
    assert set(cards) == set(df["request_id"].to_list())
    ok = df.filter(pl.col("status") == "submitted").row(0, named=True)
    # A CSV table keeps lists as JSON text; the link is still relative from the page's directory.
    assert cards[ok["request_id"]]["v"] == "../videos/" + Path(json.loads(ok["local_paths"])[0]).name
    bad = df.filter(pl.col("status") == "invalid").row(0, named=True)
    assert cards[bad["request_id"]]["x"] == 1 and "duration" in cards[bad["request_id"]]["e"]


def test_a_page_that_cannot_be_written_never_changes_collect_exit_code(fake, tmp_path: Path) -> None:
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    (tmp_path / "results.html").mkdir()  # the page's name is taken by a directory
    res = cli(collect_args(fake, tmp_path))
    assert res.exit_code == 0, res.output
    assert '"page_not_written"' in res.output and "page:" not in res.output
    assert results(tmp_path / "results.parquet")["task_status"].to_list() == ["success"] * 2


def test_report_html_of_something_else_is_one_usage_line(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    res = cli(["report", str(other), "--html", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "not a results table" in res.output and not (tmp_path / "x.html").exists()


def test_missing_and_bucket_videos_get_cards_that_say_so(tmp_path: Path) -> None:
    table = tmp_path / "r.parquet"
    pl.DataFrame({"request_id": ["a", "b"], "status": ["submitted"] * 2, "task_status": ["success"] * 2,
                  "source": ["in.csv"] * 2, "row": [2, 3], "model": ["m"] * 2, "prompt": ["x", "y"],
                  "local_paths": [[str(tmp_path / "gone.mp4")], ["s3://videos/night/b.mp4"]]}).write_parquet(table)
    html, info = render_page(str(table), str(tmp_path / "p.html"))
    cards = {c["id"]: c for c in cards_of(html)}
    assert cards["a"]["pe"] == "video file missing" and cards["a"]["v"] == "gone.mp4"
    assert cards["b"]["pe"] == "no poster: the video is in a bucket" and "v" not in cards["b"]  # no relative way
    assert info.posters == 0


def test_the_glance_says_what_was_skipped_and_not_sent(fake, tmp_path: Path) -> None:
    """The glance said "Skipped or not sent: nothing" while the run's summary listed skipped
    input files."""
    folder = tmp_path / "night"
    folder.mkdir()
    write_csv(folder / "in.csv", prompts(3))
    (folder / "notes.txt").write_text("shot list, not prompts\n")
    res = cli(submit_args(fake, tmp_path, folder, extra=["--max-requests", "2"]))
    assert res.exit_code == 1, res.output
    assert cli(collect_args(fake, tmp_path)).exit_code == 0
    html = (tmp_path / "results.html").read_text(encoding="utf-8")
    glance = html[html.index("<h2>Skipped or not sent</h2>"):]
    glance = glance[:glance.index("</ul>")]
    assert "notes.txt" in glance and "not a .csv" in glance
    assert re.search(r'<span class="n">1 ×</span> not sent[^<]*max-requests', glance), glance


def test_rows_never_sent_are_named_in_the_glance(tmp_path: Path) -> None:
    table = tmp_path / "r.parquet"
    pl.DataFrame({"request_id": ["a", "b", "c"], "status": ["pending", "pending", "dry_run"],
                  "prompt": ["one", "two", "three"]}).write_parquet(table)
    html, _ = render_page(table, tmp_path / "r.html", posters=False)
    glance = html[html.index("<h2>Skipped or not sent</h2>"):]
    assert '<span class="n">2 ×</span> not sent (pending): the next run sends them' in glance
    assert '<span class="n">1 ×</span> not sent: a dry run' in glance
