"""Where data teams keep their files (issue #14 part 2): inputs, results and videos in a
bucket, against moto's S3 server on 127.0.0.1 (a real HTTP S3 API, no mocks of client
internals), with credentials and endpoint from the standard AWS environment only."""

import io
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import cli, error_line, prompts, write_csv

from batch import storage
from batch.fake_api import fake_file_bytes

moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on a moto S3 server; the AWS_* environment points at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(name, value)
    name = f"nightly-{uuid.uuid4().hex[:10]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT"), timeout=10)
    storage._store.cache_clear()  # one client per bucket and process: not across servers
    try:
        yield name
    finally:
        server.stop()


def put(url: str, data: bytes) -> None:
    import obstore

    loc = storage.ObjectUrl.parse(url)
    obstore.put(storage.store_of(loc), loc.key, data)


def get(url: str) -> bytes | None:
    return storage.read_bytes(url)


def test_inputs_from_a_bucket_by_object_prefix_and_glob(fake, bucket: str, tmp_path: Path) -> None:
    put(f"s3://{bucket}/in/a.csv", b"id,prompt\na1,from a csv\n")
    frame = io.BytesIO()
    pl.DataFrame({"id": ["p1"], "prompt": ["from parquet"]}).write_parquet(frame)
    put(f"s3://{bucket}/in/b.parquet", frame.getvalue())
    book = openpyxl.Workbook()
    book.active.append(["ID", "Prompt"])
    book.active.append(["x1", "from a workbook"])
    data = io.BytesIO()
    book.save(data)
    put(f"s3://{bucket}/in/c.xlsx", data.getvalue())
    put(f"s3://{bucket}/in/~$c.xlsx", b"lock")
    put(f"s3://{bucket}/other/z.csv", b"prompt\nnot this one\n")

    def prompts_sent(spec: str) -> list[str]:
        before = len(fake.state.submissions())
        res = cli(["submit", spec, "-o", str(tmp_path / f"r{before}.parquet"), "--base-url", fake.url,
                   "--state", str(tmp_path / f"s{before}.sqlite"), "--rate", "0"])
        assert res.exit_code == 0, res.output
        return sorted(r.body["prompt"] for r in fake.state.submissions()[before:])

    assert prompts_sent(f"s3://{bucket}/in/") == ["from a csv", "from a workbook", "from parquet"]
    assert prompts_sent(f"s3://{bucket}/in/*.csv") == ["from a csv"]
    assert prompts_sent(f"s3://{bucket}/in/b.parquet") == ["from parquet"]
    res = cli(["validate", f"s3://{bucket}/in/c.xlsx"])
    assert res.exit_code == 0 and f"columns: s3://{bucket}/in/c.xlsx[Sheet]" in res.output
    res = cli(["submit", f"s3://{bucket}/in/nope.csv", "-o", str(tmp_path / "x.parquet"), "--dry-run"])
    assert res.exit_code == 2 and "no such object" in error_line(res.stderr)


def test_results_and_summary_to_a_bucket_as_complete_objects(fake, bucket: str, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", prompts(5))
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "s3://{bucket}/results/{{date}}.parquet"\nstate = "s.sqlite"\n'
                   f'rate = "0"\nbase_url = "{fake.url}"\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    url = f"s3://{bucket}/results/{time.strftime('%Y-%m-%d')}.parquet"
    table = pl.read_parquet(io.BytesIO(get(url)))
    assert table["status"].to_list() == ["submitted"] * 5
    assert json.loads(get(url + ".summary.json"))["counts"] == {"submitted": 5}
    # A dry run never overwrites a table that holds task ids, in a bucket either.
    before = get(url)
    res = cli(["run", str(job), "--dry-run"])
    assert res.exit_code == 0 and get(url) == before
    assert pl.read_parquet(io.BytesIO(get(url.replace(".parquet", ".dry-run.parquet"))))["status"].to_list() \
        == ["skipped"] * 5
    # collect reads and rewrites the table in the bucket.
    res = cli(["collect", str(job)])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(io.BytesIO(get(url)))["task_status"].to_list() == ["success"] * 5


def test_a_bucket_that_cannot_take_the_table_is_exit_2_before_sending(fake, bucket: str, tmp_path: Path) -> None:
    """Issue #18 item 4. Reported: every request sent, then exit 6."""
    path = write_csv(tmp_path / "in.csv", prompts(3))
    res = cli(["submit", str(path), "-o", "s3://no-such-bucket-here/r.parquet", "--base-url", fake.url,
               "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 2
    line = error_line(res.stderr)
    assert "--output s3://no-such-bucket-here/r.parquet: cannot write there" in line and "nothing sent" in line
    assert fake.state.records == []
    res = cli(["submit", str(path), "-o", f"s3://{bucket}/r.parquet", "--base-url", fake.url, "--state",
               str(tmp_path / "s.sqlite"), "--rate", "0", "--wait", "--download", "s3://no-such-bucket-here/v/"])
    assert res.exit_code == 2 and "--download s3://no-such-bucket-here/v/" in error_line(res.stderr)
    assert fake.state.records == []
    res = cli(["submit", str(path), "-o", f"s3://{bucket}/r.parquet", "--base-url", fake.url,
               "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 0 and len(fake.state.submissions()) == 3
    assert get(f"s3://{bucket}/r.parquet") is not None
    import obstore  # the probes left no object behind

    listed = [m["path"] for batch in obstore.list(storage.store_of(storage.ObjectUrl.parse(f"s3://{bucket}/")))
              for m in batch]
    assert sorted(listed) == ["r.parquet", "r.parquet.summary.json"]


def test_videos_stream_into_the_bucket_and_a_rerun_skips_them(start_fake, bucket: str, tmp_path: Path) -> None:
    fake = start_fake(video_bytes=9 << 20)  # over one 8 MiB part: a multipart upload
    path = write_csv(tmp_path / "in.csv", prompts(2))
    assert cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0"]).exit_code == 0
    args = ["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0",
            "--results", str(tmp_path / "r.parquet"), "--download", f"s3://{bucket}/videos/"]
    res = cli(args)
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(tmp_path / "r.parquet")
    for row in table.iter_rows(named=True):
        (where,) = row["local_paths"]
        assert where.startswith(f"s3://{bucket}/videos/") and where.endswith(".mp4")
        assert get(where) == fake_file_bytes(row["task_id"], "mp4", 9 << 20)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".part")]  # nothing staged locally
    downloads = sum(1 for r in fake.state.records if r.kind == "download")
    res = cli(args)
    assert res.exit_code == 0 and "already present 2" in res.output
    assert sum(1 for r in fake.state.records if r.kind == "download") == downloads


def test_a_bucket_is_no_place_for_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything is written: a file named s3:/b/state.sqlite.runmark was once
    found in the working directory (and committed)."""
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--state", "s3://b/state.sqlite",
               "--base-url", "https://api.example"])
    assert res.exit_code == 2 and "the ledger must be on local disk (SQLite locks it" in error_line(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize("args", [
    ["--metrics-file", "s3://b/night.prom"],
    ["--state", "http://b/state.sqlite"],
    ["--download", "https://b/videos/", "--wait"],
    ["-o", "https://b/r.parquet"],
    ["-o", "file:///tmp/r.parquet"],
], ids=["metrics-bucket", "state-http", "download-http", "output-http", "output-file-url"])
def test_no_local_file_is_named_after_a_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """Siblings: every place the tool writes refuses a URL it cannot write to, before writing
    anything (a URL taken as a local path becomes "http:/b/..." in the working directory)."""
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--state", str(tmp_path / "s.sqlite"),
               "--dry-run", *args])
    assert res.exit_code == 2 and args[1] in error_line(res.stderr).replace("s3:/b", "s3://b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize("dest", ["s3://b/copy.sqlite", "https://b/copy.sqlite"])
def test_a_ledger_backup_is_not_written_under_a_url_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          dest: str) -> None:
    monkeypatch.chdir(tmp_path)
    res = cli(["state", "backup", dest, "--state", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2 and "must be on local disk" in error_line(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_job_files_bucket_metrics_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "in.csv", prompts(1))
    (tmp_path / "job.toml").write_text('inputs = ["in.csv"]\noutput = "r.parquet"\nstate = "s.sqlite"\n'
                                       'metrics_file = "s3://b/night.prom"\n')
    res = cli(["run", str(tmp_path / "job.toml"), "--dry-run"])
    assert res.exit_code == 2 and "--metrics-file s3://b/night.prom" in error_line(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "job.toml"]


def test_an_aws_profile_supplies_the_credentials(fake, bucket: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore reads AWS_* variables only; a cron job often has a profile in ~/.aws instead."""
    put(f"s3://{bucket}/in/a.csv", b"id,prompt\na1,from a profile\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text("[nightly]\naws_access_key_id = profilekey\n"
                                          "aws_secret_access_key = profilesecret\n")
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_PROFILE", "nightly")
    storage._store.cache_clear()
    res = cli(["submit", f"s3://{bucket}/in/a.csv", "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
               "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 0, res.output
    assert [r.body["prompt"] for r in fake.state.submissions()] == ["from a profile"]

    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    storage._store.cache_clear()
    res = cli(["submit", f"s3://{bucket}/in/a.csv", "-o", str(tmp_path / "r2.parquet"), "--dry-run"])
    assert res.exit_code == 2
    assert "AWS profile nosuch" in error_line(res.stderr if hasattr(res, "stderr") else res.output)


def test_results_in_the_input_prefix_are_not_read_again(fake, bucket: str, tmp_path: Path) -> None:
    """Issue 18 item 1 in a bucket: `submit s3://b/in/ -o s3://b/in/<night>.parquet` night
    after night pays only for the new prompts; the tool's objects are named as skipped."""
    put(f"s3://{bucket}/in/a.csv", b"prompt\nfirst night\n")
    args = ["--base-url", fake.url, "--state", str(tmp_path / "s.sqlite"), "--rate", "0", "--no-preflight"]
    first = cli(["submit", f"s3://{bucket}/in/", "-o", f"s3://{bucket}/in/n1.parquet", *args])
    assert first.exit_code == 0, first.output
    put(f"s3://{bucket}/in/b.csv", b"prompt\nsecond night\n")
    second = cli(["submit", f"s3://{bucket}/in/", "-o", f"s3://{bucket}/in/n2.parquet", *args])
    assert second.exit_code == 0, second.output
    assert len(fake.state.accepted_bodies()) == 2
    summary = json.loads(get(f"s3://{bucket}/in/n2.parquet.summary.json") or b"{}")
    assert summary["counts"] == {"skipped": 1, "submitted": 1}
    assert summary["skipped_files"] == [
        {"source": f"s3://{bucket}/in/n1.parquet.summary.json", "reason": "a run summary of seedance-batch"},
        {"source": f"s3://{bucket}/in/n1.parquet",
         "reason": "a results table (marked in its Parquet metadata) of seedance-batch"}]
    explicit = cli(["submit", f"s3://{bucket}/in/n1.parquet", "-o", str(tmp_path / "x.parquet"), *args])
    assert explicit.exit_code == 2
    assert f"s3://{bucket}/in/n1.parquet: a results table" in error_line(explicit.stderr)
