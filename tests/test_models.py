"""Models as data (issue #13): a second model, array fields, cross-field rules, fetched
and added schemas, a sheet that mixes models, and a spend cap, over HTTP against the
fake, which checks bodies against the same specifications with fastjsonschema."""

import json
import urllib.request
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import SAMPLES, cli, error_line, results, write_csv

from batch.models import Catalog, shipped
from batch.validate import Validator

LITE = "bytedance/seedance-1.0-lite-t2v"
PRO15 = "bytedance/seedance-1.5-pro-t2v"
I2V15 = "bytedance/seedance-1.5-pro-i2v"
FAST20 = "bytedance/seedance-2.0-fast-i2v"


def submit(fake, tmp_path: Path, *inputs: Path, extra=(), out: str = "r.parquet"):
    return cli(["submit", *map(str, inputs), "-o", str(tmp_path / out), "--base-url", fake.url,
                "--state", str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


def test_every_shipped_spec_is_labelled_with_its_completeness_and_date() -> None:
    specs = shipped()
    assert len(specs) == 8
    assert specs[LITE].completeness == "complete" and specs[LITE].source_date == "2026-11-28"
    mini = "bytedance/seedance-2.0-mini-t2v"  # issue 20: only its prompt is stated anywhere
    assert specs[mini].completeness == "partial" and specs[mini].source_date == "2026-12-06"
    assert {s.completeness for slug, s in specs.items() if slug not in (LITE, mini)} == {"nearly complete"}
    assert "service_tier" not in specs[FAST20].fields  # the 2.0 family has no tier
    assert "frames" not in specs[PRO15].fields and "generate_audio" in specs[PRO15].fields


def test_a_second_model_with_a_field_the_seed_lacks(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a lighthouse", "Generate audio": "no", "duration": "6"}])
    res = submit(fake, tmp_path, path, extra=["--model", PRO15])
    assert res.exit_code == 0, res.output
    (sub,) = fake.state.submissions()
    assert sub.path == f"/api/v1/{PRO15}"  # the model's documented route
    assert sub.body == {"prompt": "a lighthouse", "generate_audio": False, "duration": 6, "service_tier": "flex"}
    bad = write_csv(tmp_path / "bad.csv", [{"prompt": "x", "frames": "29"}])
    res = submit(fake, tmp_path, bad, extra=["--model", PRO15])
    assert res.exit_code == 2 and f"column 'frames': {PRO15} has no field 'frames'" in error_line(res.stderr)
    res = submit(fake, tmp_path, write_csv(tmp_path / "d.csv", [{"prompt": "x", "duration": "3"}]),
                 extra=["--model", PRO15])
    assert res.exit_code == 1
    assert "duration='3': must be an integer in [4, 12]" in results(tmp_path / "r.parquet")["error"][0]


def test_array_fields_take_a_list_as_their_value_not_an_expansion(fake, tmp_path: Path) -> None:
    pq = tmp_path / "in.parquet"
    pl.DataFrame({
        "prompt": ["two refs", "ten refs", "json refs"],
        "reference_images": [["https://x/a.png", "https://x/b.png"], [f"https://x/{i}.png" for i in range(10)], None],
        "ratio": [["16:9", "9:16"], None, None],
    }).write_parquet(pq)
    csv = write_csv(tmp_path / "in.csv", [{"prompt": "from csv", "reference_images": '["https://x/c.png"]'}])
    res = submit(fake, tmp_path, pq, csv, extra=["--model", FAST20])
    assert res.exit_code == 1
    df = results(tmp_path / "r.parquet")
    assert df.select("prompt", "status").rows() == [("two refs", "submitted"), ("two refs", "submitted"),
                                                    ("ten refs", "invalid"), ("json refs", "submitted"),
                                                    ("from csv", "submitted")]
    assert "must hold at most 9 items (has 10)" in df.filter(pl.col("prompt") == "ten refs")["error"][0]
    sent = sorted((b["prompt"], b.get("ratio"), b.get("reference_images")) for b in (r.body for r in fake.state.submissions()))
    assert sent == [("from csv", None, ["https://x/c.png"]), ("json refs", None, None),
                    ("two refs", "16:9", ["https://x/a.png", "https://x/b.png"]),
                    ("two refs", "9:16", ["https://x/a.png", "https://x/b.png"])]  # lists of other fields still expand
    assert df.schema["reference_images"] == pl.List(pl.String)


def test_cross_field_rules_are_named_and_enforced(fake, tmp_path: Path) -> None:
    rows = [{"prompt": "no image", "model": I2V15},
            {"prompt": "first frame", "first_frame_image": "https://x/f.png", "model": I2V15},
            {"prompt": "both", "first_frame_image": "https://x/f.png", "reference_images": '["https://x/r.png"]',
             "model": FAST20}]
    res = submit(fake, tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert res.exit_code == 1
    errors = dict(zip(*results(tmp_path / "r.parquet").select("prompt", "error"), strict=True))
    assert errors["no image"] == "first_frame_image, last_frame_image: at least one is required"
    assert errors["both"] == "reference_images: not together with first_frame_image or last_frame_image"
    assert errors["first frame"] is None
    assert [r.body["prompt"] for r in fake.state.submissions()] == ["first frame"]


def test_a_fetched_schema_wins_over_the_shipped_one(start_fake, tmp_path: Path, own_state_home: Path) -> None:
    spec = shipped()[LITE]
    stricter = json.loads(json.dumps(spec.schema))
    stricter["properties"]["prompt"]["maxLength"] = 40
    fake = start_fake(schemas={LITE: {"servers": [{"url": spec.route}],
                                      "post": {"requestBody": {"content": {"application/json": {"schema": stricter}}}}}})
    res = cli(["models", "fetch", LITE, "--schema-base", fake.url])
    assert res.exit_code == 0, res.output
    assert [r.kind for r in fake.state.records] == ["schema"]
    assert (own_state_home / "seedance-batch" / "models" / "bytedance__seedance-1.0-lite-t2v.json").exists()
    listed = cli(["models"]).output
    assert f"{LITE}  t2v  fetched, as published" in listed and "rules: frames_25_plus_4n" in listed
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x" * 41}, {"prompt": "short enough"}])
    res = submit(fake, tmp_path, path)
    df = results(tmp_path / "r.parquet")
    assert "must be at most 40 characters (has 41)" in df["error"][0] and df["status"][1] == "submitted"
    assert res.exit_code == 1


def test_models_add_from_a_file(tmp_path: Path) -> None:
    doc = {"servers": [{"url": "https://api.modellix.ai/api/v1/acme/clip-1/async"}],
           "post": {"requestBody": {"content": {"application/json": {"schema": {
               "type": "object", "required": ["prompt"],
               "properties": {"prompt": {"type": "string", "maxLength": 100}, "fps": {"type": "integer", "enum": [24, 30]}}
           }}}}}}
    (tmp_path / "clip.json").write_text(json.dumps(doc))
    res = cli(["models", "add", str(tmp_path / "clip.json")])
    assert res.exit_code == 0 and "acme/clip-1: 2 fields (prompt, fps) added" in res.output
    catalog = Catalog(Path(__import__("os").environ["XDG_STATE_HOME"]) / "seedance-batch" / "models")
    validator = Validator(catalog.get("acme/clip-1"))
    assert validator.convert("fps", "30") == 30
    with pytest.raises(ValueError, match="must be one of 24, 30"):
        validator.convert("fps", "25")
    (tmp_path / "junk.json").write_text('{"servers": []}')
    res = cli(["models", "add", str(tmp_path / "junk.json")])
    assert res.exit_code == 2 and "not a model schema document" in error_line(res.stderr)


def test_a_sheet_that_mixes_models(fake, tmp_path: Path) -> None:
    res = submit(fake, tmp_path, SAMPLES / "mixed-models.xlsx")
    assert res.exit_code == 1, res.output  # mx-05 breaks a rule on purpose
    df = results(tmp_path / "r.parquet")
    assert df["status"].to_list() == ["submitted"] * 4 + ["invalid"]
    routes = {r.path for r in fake.state.submissions()}
    assert routes == {f"/api/v1/{PRO15}", f"/api/v1/{FAST20}/async"}
    assert df["model"].to_list() == [PRO15, PRO15, FAST20, FAST20, FAST20]
    by_id = {r["ID"]: r for r in df.iter_rows(named=True)}
    assert by_id["mx-03"]["reference_images"] == ["https://example.com/shoe-front.png", "https://example.com/shoe-side.png"]
    assert by_id["mx-01"]["generate_audio"] is True


def test_the_same_prompt_for_two_models_is_two_videos(fake, tmp_path: Path) -> None:
    rows = [{"prompt": "same", "model": LITE}, {"prompt": "same", "model": PRO15}]
    res = submit(fake, tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert res.exit_code == 0
    assert len(fake.state.accepted_bodies()) == 2
    assert len(set(results(tmp_path / "r.parquet")["request_id"])) == 2


def test_the_fake_checks_bodies_against_the_same_specs(fake) -> None:
    def post(route: str, body: dict) -> tuple[int, str]:
        req = urllib.request.Request(fake.url + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert post(f"/api/v1/{PRO15}", {"prompt": "x", "frames": 29}) == \
        (400, json.dumps({"code": 400, "message": "Bad Request: data: must not contain {'frames'} properties"}))
    status, text = post(f"/api/v1/{FAST20}/async", {"prompt": "x", "first_frame_image": "a", "reference_images": ["b"]})
    assert status == 400 and "not together with" in text
    assert post(f"/api/v1/{FAST20}/async", {"prompt": "x", "reference_images": ["b"]})[0] == 200


def test_a_spend_cap_stops_the_run_and_needs_every_price(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}", "duration": "5"} for i in range(20)])
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{LITE}"]\n"480p" = 0.01\n"720p" = 0.02\n"1080p" = 0.04\n')  # 5 s flex at 720p: 0.05 USD
    metrics = tmp_path / "seedance.prom"
    res = submit(fake, tmp_path, path, extra=["--prices", str(prices), "--max-spend", "0.2", "--concurrency", "1",
                                              "--metrics-file", str(metrics)])
    assert res.exit_code == 1, res.output
    counts = dict(zip(*results(tmp_path / "r.parquet")["status"].value_counts().to_dict(as_series=False).values(),
                      strict=True))
    assert counts == {"submitted": 4, "pending": 16}
    assert len(fake.state.submissions()) == 4
    assert "stop reason: --max-spend 0.2 USD reached for the night of " in res.output
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert summary["spend"]["this_run_usd"] == 0.2 and summary["stop_reason"].startswith("--max-spend")
    assert 'seedance_batch_last_run_stop{job="submit",reason="max_spend"} 1' in metrics.read_text()
    prices.write_text(f'["{LITE}"]\n"720p" = 0.02\n')
    res = submit(fake, tmp_path, path, extra=["--prices", str(prices), "--max-spend", "5"])
    assert res.exit_code == 2 and f"no price for {LITE} at 480p, 1080p" in error_line(res.stderr)
    res = submit(fake, tmp_path, path, extra=["--max-spend", "5"])
    assert res.exit_code == 2 and "--max-spend needs prices" in error_line(res.stderr)


def test_a_job_file_takes_model_prices_and_cap(fake, tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    book.active.append(["Prompt", "Generate audio"])
    book.active.append(["a lighthouse", "yes"])
    book.save(tmp_path / "in.xlsx")
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.xlsx"]\noutput = "r.parquet"\nstate = "s.sqlite"\nrate = "0"\nmodel = "{PRO15}"\n'
                   f'base_url = "{fake.url}"\nmax_spend = 10\n[prices."{PRO15}"]\n"480p" = 0.01\n"720p" = 0.02\n'
                   f'"1080p" = 0.03\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    assert [r.body for r in fake.state.submissions()] == [{"prompt": "a lighthouse", "generate_audio": True,
                                                           "service_tier": "flex"}]


@pytest.mark.parametrize(("marker", "render"), [("models", "table"), ("aliases", "aliases_table")])
def test_the_readme_tables_are_the_specs(marker: str, render: str) -> None:
    """The model table and the header-synonym table in README are generated from the specs."""
    import importlib.util

    tool = Path(__file__).resolve().parent.parent / "tools" / "models_table.py"
    module_spec = importlib.util.spec_from_file_location("models_table", tool)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin, end = readme.index(f"<!-- {marker}:begin -->"), readme.index(f"<!-- {marker}:end -->")
    assert readme[begin:end].split("\n", 1)[1].strip() == getattr(module, render)().strip()
