"""Every s3:// path medpipe accepts, against a real S3 API server (moto's, tests/s3server.py) on loopback, through
s3fs with the standard AWS_* settings: shards (write and train), batch input (a prefix, a manifest) and output,
Ground Truth manifests and their images, monitoring capture; and the faults: a missing bucket, a denied key, a
truncated object, the server gone mid-job (clear errors naming the URL; nothing already written lost)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medpipe.cli import main
from tests.s3server import s3_env, s3_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tests" / "data" / "densenet-test"
BATCH = ["--model", str(PKG), "--backend", "eager", "--device", "cpu", "--workers", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def images(data_dir, tmp_path_factory) -> Path:
    """13 images in two folders, one of them truncated (a corrupt upload)."""
    out = tmp_path_factory.mktemp("s3imgs") / "images"
    paths = pd.read_csv(data_dir / "records.csv")["path"].tolist()[:12]
    for i, p in enumerate(paths):
        (out / f"site{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, out / f"site{i % 2}" / Path(p).name)
    (out / "site1" / "cut.jpg").write_bytes(Path(paths[0]).read_bytes()[:400])
    return out


@pytest.fixture(scope="module")
def local_rows(images, tmp_path_factory) -> dict:
    """The local engine's rows for ``images`` (the reference every S3 run must equal); this local run never asks
    for an S3 client (the startup rule: local batch does not import s3fs)."""
    from medpipe.data import s3

    def refuse():
        raise AssertionError("a local batch job asked for an S3 client")

    out = tmp_path_factory.mktemp("s3ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s3, "filesystem", refuse)
        assert main(["batch", *BATCH, "--input", str(images), "--output", str(out), "--shard-size", "4"]) == 0
    return {r["path"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def _rows(data: bytes) -> dict:
    return {r["path"]: r for r in map(json.loads, data.decode().splitlines())}


def _same(rows: dict, ref: dict) -> None:
    assert rows.keys() == ref.keys()
    for path, r in rows.items():
        assert r.get("error") == ref[path].get("error"), path
        if "probabilities" in r:
            assert r["label"] == ref[path]["label"]
            assert all(abs(r["probabilities"][c] - ref[path]["probabilities"][c]) <= 1e-6 for c in r["probabilities"])


def test_batch_from_an_s3_prefix_to_an_s3_output_equals_the_local_run(s3_env, images, local_rows):
    b = s3_env.bucket()
    s3_env.put_tree(images, f"s3://{b}/in")
    out = f"s3://{b}/jobs/out"
    assert main(["batch", *BATCH, "--input", f"s3://{b}/in/", "--output", out, "--shard-size", "4", "--per-file",
                 "--manifest-out", f"s3://{b}/jobs/review.manifest"]) == 0
    rows = _rows(s3_env.get(f"{out}/predictions.jsonl"))
    _same(rows, local_rows)
    assert rows["site1/cut.jpg"]["error"] == "corrupt_image"
    names = {u[len(out) + 1:] for u in s3_env.ls(out)}
    assert {"batch.json", "predictions.jsonl", "predictions.csv"} <= names
    assert {f"shards/part-{k:05d}.jsonl" for k in range(4)} <= names
    assert sum(n.endswith(".out") for n in names) == 12  # per-file outputs for every answered image
    state = json.loads(s3_env.get(f"{out}/batch.json"))
    assert state["predicted"] == 12 and state["errors"] == 1 and state["outputs"]["jsonl"] == f"{out}/predictions.jsonl"
    review = [json.loads(x) for x in s3_env.get(f"s3://{b}/jobs/review.manifest").decode().splitlines()]
    assert len(review) == 12 and all(r["source-ref"].startswith(f"s3://{b}/in/site") for r in review)


def test_batch_manifest_on_s3_missing_key_bad_reference_and_missing_buckets(s3_env, images, tmp_path, capsys):
    b = s3_env.bucket()
    s3_env.put_tree(images, f"s3://{b}/in")
    first = sorted((images / "site0").iterdir())[0].name
    s3_env.put(f"s3://{b}/m/beside.jpg", (images / "site0" / first).read_bytes())
    s3_env.put(f"s3://{b}/m/empty.png", b"")
    lines = [{"source-ref": f"s3://{b}/in/site0/{first}"}, {"source-ref": "beside.jpg"},
             {"source-ref": f"s3://{b}/in/gone.jpg"}, {"source-ref": "../escape.jpg"}, {"source-ref": "empty.png"}]
    s3_env.put(f"s3://{b}/m/job.manifest", "".join(json.dumps(x) + "\n" for x in lines).encode() + b'{"source-ref"')
    out = tmp_path / "out"
    assert main(["batch", *BATCH, "--input", f"s3://{b}/m/job.manifest", "--output", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("error") for r in rows] == [None, None, "unreadable_file", "unsupported_reference", "empty_image",
                                             "bad_manifest_line"]  # the last line: a truncated manifest
    assert rows[0]["probabilities"] == rows[1]["probabilities"]  # the same bytes, one by key beside the manifest
    assert f"s3://{b}/in/gone.jpg" in rows[2]["message"] and "no such key" in rows[2]["message"]
    capsys.readouterr()
    assert main(["batch", *BATCH, "--input", "s3://medpipe-no-such-bucket/in/", "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "s3://medpipe-no-such-bucket/in/" in err and "no such bucket" in err and "Traceback" not in err
    assert main(["batch", *BATCH, "--input", str(images), "--output", "s3://medpipe-no-such-bucket/out"]) == 2
    err = capsys.readouterr().err
    assert "s3://medpipe-no-such-bucket/out" in err and "no such bucket" in err


def test_batch_denied_key_is_an_error_row_naming_it(s3_env, images, tmp_path, monkeypatch):
    """An IAM user may read s3://B/in/site0/ only; moto enforces IAM inside ``auth()``. (moto checks a HEAD against
    another action than s3:GetObject, so the allowed prefix gets s3:*; the denied one gets nothing.)"""
    b = s3_env.bucket()
    s3_env.put_tree(images, f"s3://{b}/in")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": [f"arn:aws:s3:::{b}/in/site0/*"]},
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{b}"]}]}
    user = s3_env.user(f"reader-{b[-6:]}", policy)
    a, d = sorted((images / "site0").iterdir())[0].name, sorted((images / "site1").iterdir())[0].name
    manifest = tmp_path / "job.manifest"
    manifest.write_text(json.dumps({"source-ref": f"s3://{b}/in/site0/{a}"}) + "\n" +
                        json.dumps({"source-ref": f"s3://{b}/in/site1/{d}"}) + "\n")
    for k, v in user.items():
        monkeypatch.setenv(k, v)
    with s3_env.auth():
        assert main(["batch", *BATCH, "--input", str(manifest), "--output", str(tmp_path / "out")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert "probabilities" in rows[0]
    assert rows[1]["error"] == "unreadable_file" and f"s3://{b}/in/site1/{d}" in rows[1]["message"]
    assert "access denied" in rows[1]["message"]


def test_batch_server_gone_mid_job_keeps_the_finished_parts_and_resumes(s3_env, images, local_rows, monkeypatch,
                                                                         caplog):
    """S3 input and output; the server stops after the second part is put: the job ends with an error naming the
    part's URL and how to resume; the parts put before are still there; a rerun does only the rest."""
    from medpipe import batch
    from medpipe.errors import StorageError

    b = s3_env.bucket()
    s3_env.put_tree(images, f"s3://{b}/in")
    out = f"s3://{b}/out"
    s3_env.fail_fast(monkeypatch)
    put = batch._Output.put
    puts = []

    def put_then_cut(self, path):
        put(self, path)
        puts.append(Path(path).name)
        if puts.count("part-00001.jsonl") == 1 and puts[-1] == "part-00001.jsonl":
            s3_env.stop()

    monkeypatch.setattr(batch._Output, "put", put_then_cut)
    with pytest.raises(StorageError) as exc:
        batch.run_batch(str(PKG), f"s3://{b}/in", out, shard_size=4, backend="eager", device="cpu", workers=2)
    msg = str(exc.value)
    assert f"{out}/shards/part-00002.jsonl" in msg and "cannot reach" in msg and "run the same command again" in msg
    s3_env.start()
    monkeypatch.setattr(batch._Output, "put", put)
    assert [u.rsplit("/", 1)[1] for u in s3_env.ls(f"{out}/shards")] == ["part-00000.jsonl", "part-00001.jsonl"]
    with caplog.at_level("INFO", logger="medpipe.batch"):
        s = batch.run_batch(str(PKG), f"s3://{b}/in", out, shard_size=4, backend="eager", device="cpu", workers=2)
    assert "resuming: 8 of 13 items already done" in caplog.text
    assert s["predicted"] == 12 and s["missing"] == 0
    rows = _rows(s3_env.get(f"{out}/predictions.jsonl"))
    assert len(rows) == 13
    _same(rows, local_rows)


def test_batch_s3_input_unreachable_gives_transient_rows_a_rerun_answers(s3_env, images, local_rows, tmp_path,
                                                                           monkeypatch, capsys):
    from medpipe import batch

    b = s3_env.bucket()
    s3_env.put_tree(images, f"s3://{b}/in")
    s3_env.fail_fast(monkeypatch)
    run = batch.LocalEngine.run
    calls = []

    def run_then_cut(self, items, futures):
        rows = run(self, items, futures)
        calls.append(1)
        if len(calls) == 1:
            s3_env.stop()
        return rows

    monkeypatch.setattr(batch.LocalEngine, "run", run_then_cut)
    args = ["batch", *BATCH, "--input", f"s3://{b}/in", "--output", str(tmp_path / "out"), "--shard-size", "4"]
    assert main(args) == 75  # EX_TEMPFAIL: some rows got no answer; run again
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    missing = [r for r in rows if r.get("transient")]
    assert missing and all("cannot reach" in r["message"] and r["path"] in r["message"] for r in missing)
    s3_env.start()
    monkeypatch.setattr(batch.LocalEngine, "run", run)
    assert main(args) == 0
    _same(_rows((tmp_path / "out" / "predictions.jsonl").read_bytes()), local_rows)


@pytest.fixture(scope="module")
def s3_shards(s3_server, data_dir, tmp_path_factory):
    """A shard set written straight to S3 by ``medpipe shard --out s3://...``."""
    b = s3_server.bucket()
    data = tmp_path_factory.mktemp("s3sh") / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("cache"))
    mp = pytest.MonkeyPatch()
    for k, v in s3_server.env.items():
        mp.setenv(k, v)
    try:
        assert main(["shard", "--data", str(data), "--out", f"s3://{b}/shards", "--image-size", "32",
                     "--shard-size", "8"]) == 0
    finally:
        mp.undo()
    return f"s3://{b}/shards"


def test_train_streams_shards_from_s3(s3_env, s3_shards, tmp_path):
    from tests.conftest import TINY

    index = json.loads(s3_env.get(f"{s3_shards}/index.json"))
    assert index["image_size"] == 32 and {f"{s3_shards}/{s['name']}" for s in index["shards"]} <= set(
        s3_env.ls(s3_shards))
    run = tmp_path / "run"
    assert main(["train", "--data", s3_shards, "--out", str(run), *TINY, "--epochs", "1"]) == 0
    assert (run / "model" / "model.json").is_file()
    assert json.loads((run / "shards_index.json").read_text())["root"] == s3_shards


def test_shard_faults_name_the_url_and_the_reason(s3_env, s3_shards, tmp_path, monkeypatch, capsys):
    from medpipe.data.shards import iter_shard, read_index
    from medpipe.errors import ShardError

    assert main(["train", "--data", "s3://medpipe-no-such-bucket/shards", "--out", str(tmp_path / "r"),
                 "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "s3://medpipe-no-such-bucket/shards/index.json" in err and "no such bucket" in err
    # a truncated shard (a copy cut in half): training stops with an error naming it
    b = s3_env.bucket()
    index = read_index(s3_shards)
    name = next(s["name"] for s in index["shards"] if s["split"] == "val")
    for s in index["shards"]:
        data = s3_env.get(f"{s3_shards}/{s['name']}")
        s3_env.put(f"s3://{b}/cut/{s['name']}", data[: len(data) // 2] if s["name"] == name else data)
    s3_env.put(f"s3://{b}/cut/index.json", s3_env.get(f"{s3_shards}/index.json"))
    assert main(["train", "--data", f"s3://{b}/cut", "--out", str(tmp_path / "r2"), "--image-size", "32",
                 "--epochs", "1", "--model", "densenet-test"]) == 2
    err = capsys.readouterr().err
    assert f"s3://{b}/cut/{name}" in err and "truncated" in err and "Traceback" not in err
    # the endpoint gone while streaming
    s3_env.fail_fast(monkeypatch)
    stream = iter_shard(s3_shards, name)
    s3_env.stop()
    with pytest.raises(ShardError, match="cannot reach the S3 endpoint") as exc:
        list(stream)
    assert f"{s3_shards}/{name}" in str(exc.value)


def _gt_manifest(data_dir: Path, n: int) -> tuple[list[str], pd.DataFrame]:
    table = pd.read_csv(data_dir / "records.csv", dtype=str).head(n)
    classes = json.loads((data_dir / "classes.json").read_text())
    return classes, table


def test_ingest_a_groundtruth_manifest_and_its_images_from_s3(s3_env, data_dir, tmp_path, monkeypatch):
    from medpipe.batch import list_items
    from medpipe.data import s3
    from medpipe.data.sources import ingest
    from medpipe.errors import IngestError

    b = s3_env.bucket()
    classes, table = _gt_manifest(data_dir, 16)
    lines = []
    for i, r in enumerate(table.itertuples()):
        key = f"imgs/{r.image_id}.jpg"
        s3_env.put(f"s3://{b}/{key}", Path(r.path).read_bytes())
        # the first row: a relative reference climbing out of the copy of the bucket (to a local file)
        ref = "../" * 12 + "etc/hostname" if i == 0 else f"s3://{b}/{key}"
        lines.append({"source-ref": ref, "lesion_id": r.group_id, "dx": int(classes.index(r.label)),
                      "dx-metadata": {"class-name": r.label, "type": "groundtruth/image-classification"}})
    lines.append({**lines[1], "source-ref": f"s3://{b}/imgs/gone.jpg"})
    s3_env.put(f"s3://{b}/gt/train.manifest", "".join(json.dumps(x) + "\n" for x in lines).encode())
    report = ingest(f"s3://{b}/gt/train.manifest", tmp_path / "data", workers=1)
    assert report["records"] == 15 and report["source"] == f"s3://{b}/gt/train.manifest"
    reasons = {d["reason"]: d["detail"] for d in report["defects"]}
    assert f"s3://{b}/imgs/gone.jpg" in reasons["missing_file"] and "no such key" in reasons["missing_file"]
    assert "outside_root" in reasons  # a manifest on S3 never makes ingest read a local file
    paths = pd.read_csv(tmp_path / "data" / "records.csv", dtype=str)["path"]
    assert all(Path(p).is_relative_to((tmp_path / "data" / "s3").resolve()) for p in paths)
    items, _ = list_items(tmp_path / "data")  # batch over the ingested folder: its rows are inside the copy
    assert len(items) == 15 and not any(it.error for it in items)

    # the server gone after 4 objects: a clear error, what was fetched is kept, a rerun fetches the rest
    s3_env.fail_fast(monkeypatch)
    download, got = s3.download, []

    def download_then_cut(url, dest, max_bytes=None):
        if len(got) >= 4:
            s3_env.stop()
        download(url, dest, max_bytes)
        got.append(url)

    monkeypatch.setattr(s3, "download", download_then_cut)
    with pytest.raises(IngestError, match="run the same command again") as exc:
        ingest(f"s3://{b}/gt/train.manifest", tmp_path / "data2", workers=1)
    assert f"s3://{b}/" in str(exc.value) and "cannot reach" in str(exc.value)
    kept = list((tmp_path / "data2" / "s3").rglob("*.jpg"))
    assert len(kept) >= 3
    s3_env.start()
    monkeypatch.setattr(s3, "download", download)
    again = ingest(f"s3://{b}/gt/train.manifest", tmp_path / "data2", workers=1)
    assert again["records_sha256"] == report["records_sha256"]


def test_monitor_check_reads_capture_from_s3(s3_env, data_dir, tmp_path, capsys):
    from medpipe.infer.predictor import Predictor
    from medpipe.monitor.capture import CaptureWriter
    from medpipe.monitor.reader import ReadLog, read_capture

    assert main(["monitor", "baseline", "--model", str(PKG), "--data", str(data_dir), "--split", "all",
                 "--out", str(tmp_path / "base"), "--backend", "eager", "--device", "cpu"]) == 0
    pr = Predictor(PKG, device="cpu")
    images = [Path(p).read_bytes() for p in pd.read_csv(data_dir / "records.csv")["path"][:30]]
    probs = pr.probabilities([pr.decode(x) for x in images])
    w = CaptureWriter(tmp_path / "cap", {"package_sha256": json.loads((PKG / "model.json").read_text())[
        "weights_sha256"], "model": pr.name, "version": pr.version})
    for i, x in enumerate(images):
        body = json.dumps({"model": pr.name, "version": pr.version,
                           "predictions": [p.as_dict() for p in pr.to_predictions(probs[i:i + 1])]}).encode()
        w.submit("image/jpeg", x, [("bytes", x)], body, "application/json")
    w.close()
    b = s3_env.bucket()
    urls = s3_env.put_tree(tmp_path / "cap", f"s3://{b}/capture")
    first = s3_env.get(urls[0]).split(b"\n")[0]
    s3_env.put(f"s3://{b}/capture/zz/cut.jsonl", first[: len(first) // 2])  # a truncated object
    local = read_capture(tmp_path / "cap", pr.classes, None, ReadLog())
    log = ReadLog()
    remote = read_capture(f"s3://{b}/capture", pr.classes, None, log)
    assert remote.event_ids == local.event_ids and len(local.event_ids) == 30
    assert abs(remote.probs - local.probs).max() == 0
    assert log.counts.get("bad_line") == 1 and any("cut.jsonl" in n for n in log.named["bad_line"])
    code = main(["monitor", "check", "--baseline", str(tmp_path / "base"), "--capture", f"s3://{b}/capture",
                 "--window", "30", "--out", str(tmp_path / "out")])
    assert code in (0, 3)
    res = json.loads((tmp_path / "out" / "windows.json").read_text())
    assert res["summary"]["images"] == 30 and res["summary"]["skipped"].get("bad_line") == 1
    capsys.readouterr()
    assert main(["monitor", "check", "--baseline", str(tmp_path / "base"), "--capture",
                 "s3://medpipe-no-such-bucket/capture", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "s3://medpipe-no-such-bucket/capture" in err and "no such bucket" in err


def test_help_serve_and_batch_modules_do_not_import_s3_clients():
    """``medpipe --help``, the server's app and the batch/shard/monitor/ingest modules import no S3 client (a local
    batch run asks for none either: see ``local_rows``)."""
    code = """
import sys
from medpipe.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
import medpipe.serve.app, medpipe.batch, medpipe.data.shards, medpipe.data.sources, medpipe.monitor.jobs
print(sorted(m for m in sys.modules if m.split(".")[0] in ("s3fs", "boto3", "botocore", "aiobotocore", "moto")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
