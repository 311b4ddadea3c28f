"""The provider as it moved on (issue 20), over HTTP against the fake: Seedance 2.0 Mini
and the provider's defaults, every task state and ``result_expires_at``, ``x-request-id``
on submissions, and the submit-429 rule."""

from pathlib import Path

from conftest import cli, error_line, results, write_csv

from batch.models import Catalog, names_only, shipped

LITE = "bytedance/seedance-1.0-lite-t2v"
MINI = "bytedance/seedance-2.0-mini-t2v"
FAST_I2V = "bytedance/seedance-2.0-fast-i2v"


def submit(url: str, tmp_path: Path, path: Path, *extra: str, out: str = "r.parquet"):
    return cli(["submit", str(path), "-o", str(tmp_path / out), "--base-url", url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


def collect(url: str, tmp_path: Path, *extra: str):
    return cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", url, "--rate", "0",
                "--results", str(tmp_path / "r.parquet"), *extra])


# -- 1. Seedance 2.0 Mini and the provider's defaults ---------------------------------------------

def test_mini_is_shipped_with_only_the_field_a_source_states() -> None:
    spec = shipped()[MINI]
    assert (spec.kind, spec.completeness, spec.source_date) == ("t2v", "partial", "2026-12-06")
    assert list(spec.fields) == ["prompt"] and spec.fields["prompt"].required
    assert spec.provider_default == "t2v" and shipped()[FAST_I2V].provider_default == "i2v"
    assert shipped()[LITE].provider_default is None
    # named but never described: known, not shipped as specs
    assert "bytedance/seedance-2.0-mini-i2v" in names_only() and "bytedance/seedance-2.0-mini-i2v" not in shipped()


def test_a_sheet_for_mini_sends_the_prompt_and_refuses_an_unstated_field(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox in snow", "model": MINI},
                                           {"prompt": "a fox in rain", "model": MINI, "duration": "5"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 1, res.output  # the second row is invalid; the first is sent
    assert [(r.path, r.body) for r in fake.state.submissions()] == [
        ("/api/v1/bytedance/seedance-2.0-mini-t2v/async", {"prompt": "a fox in snow"})]
    table = results(tmp_path / "r.parquet").sort("prompt")
    bad = table.filter(table["prompt"] == "a fox in rain").row(0, named=True)
    assert bad["status"] == "invalid" and "duration" in bad["error"] and MINI in bad["error"]


def test_preflight_for_an_unlisted_model_names_the_listed_seedance_models_and_how_to_switch(
        start_fake, tmp_path: Path) -> None:
    fake = start_fake(models=(MINI, FAST_I2V, "google/nano-banana-2-lite"))
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", [{"prompt": "a lake"}]))
    assert res.exit_code == 5
    line = error_line(res.stderr)
    assert f"{LITE} is not listed (3 models listed); listed Seedance models: {FAST_I2V}, {MINI}" in line
    assert "--model SLUG, a model column, or model = \"SLUG\" in the job file" in line
    assert "nano-banana" not in line
    assert fake.state.submissions() == []


def test_models_list_marks_the_defaults_and_the_names_known_only(tmp_path: Path) -> None:
    out = cli(["models", "list"]).output
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("bytedance/")}
    assert "[provider's default for t2v]" in lines[MINI] and "[provider's default for i2v]" in lines[FAST_I2V]
    assert "[this tool's default]" in lines[LITE] and "provider's default" not in lines[LITE]
    assert "known by name only" in out and "bytedance/seedance-2.0-mini-i2v (i2v)" in out
    assert Catalog().find(MINI) is not None
