"""Batch transform (the export tests are in test_export.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medpipe.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder50(data_dir, tmp_path_factory):
    """50 images in nested folders, 2 of them corrupt."""
    out = tmp_path_factory.mktemp("batch_in") / "images"
    paths = pd.read_csv(data_dir / "records.csv")["path"].tolist()[:48]
    for i, p in enumerate(paths):
        d = out / f"site{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / Path(p).name)
    (out / "site0" / "broken.jpg").write_bytes(Path(paths[0]).read_bytes()[:300])
    (out / "site1" / "empty.png").write_bytes(b"")
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def test_folder_with_two_corrupt_files(trained_run, folder50, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["batch", "--model", str(trained_run / "model"), "--input", str(folder50), "--output", str(out),
               "--per-file", "--manifest-out", str(out / "review.manifest"), "--shard-size", "16", "--batch-size", "8"])
    assert rc == 0
    rows = _rows(out)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50
    errors = [r for r in rows if "error" in r]
    assert sorted(r["path"] for r in errors) == ["site0/broken.jpg", "site1/empty.png"]
    assert {r["error"] for r in errors} == {"corrupt_image", "empty_image"}
    assert sum("label" in r for r in rows) == 48
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 50 and table["error"].notna().sum() == 2
    assert {"id", "path", "label", "class_index", "akiec", "vasc", "error", "message"} <= set(table.columns)
    good = next(r for r in rows if "label" in r)
    per_file = json.loads((out / (good["path"] + ".out")).read_text())
    assert per_file["predictions"][0]["probabilities"] == good["probabilities"]
    assert not (out / "site0" / "broken.jpg.out").exists()
    manifest = [json.loads(x) for x in (out / "review.manifest").read_text().splitlines()]
    assert len(manifest) == 48
    m = manifest[0]
    assert isinstance(m["medpipe-label"], int) and m["medpipe-label-metadata"]["class-name"] in good["probabilities"]
    assert m["medpipe-label-metadata"]["type"] == "groundtruth/image-classification"
    # the error-rate threshold turns 2/50 into a failing exit code, and the rows stay
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(folder50), "--output", str(out),
                 "--shard-size", "16", "--max-error-rate", "0.01"]) == 3
    assert len(_rows(out)) == 50


def test_batch_equals_predictor_and_server_path(trained_run, folder50, tmp_path):
    from medpipe.infer.predictor import Predictor

    out = tmp_path / "out"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(folder50), "--output", str(out),
                 "--backend", "eager", "--batch-size", "1"]) == 0
    p = Predictor(trained_run / "model")
    for r in _rows(out)[:6]:
        if "label" in r:
            ref = p.predict_bytes([(folder50 / r["path"]).read_bytes()])[0].probabilities
            assert all(abs(r["probabilities"][c] - ref[c]) < 1e-6 for c in ref)


def test_kill_and_restart_gives_the_uninterrupted_rows(trained_run, folder50, tmp_path):
    straight = tmp_path / "straight"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(folder50), "--output", str(straight),
                 "--shard-size", "5", "--backend", "eager"]) == 0
    out = tmp_path / "resumed"
    args = ["batch", "--model", str(trained_run / "model"), "--input", str(folder50),
            "--output", str(out), "--shard-size", "5", "--backend", "eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # each shard followed by 0.4 s (tests/slow.py), so the kill lands mid-job
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow", "shard", "0.4", *args], env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("part-*.jsonl"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done = len(list((out / "shards").glob("part-*.jsonl")))
    assert 3 <= done < 10, done  # killed halfway
    assert not (out / "predictions.jsonl").exists()
    r = subprocess.run([sys.executable, "-m", "medpipe", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _rows(out) == _rows(straight)
    assert (out / "predictions.csv").read_text() == (straight / "predictions.csv").read_text()


def test_manifest_paths_are_confined_to_the_input_root(trained_run, folder50, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    good = next(folder50.rglob("*.jpg"))
    shutil.copy(good, root / "ok.jpg")
    outside = tmp_path / "secret.jpg"
    shutil.copy(good, outside)
    (root / "link.jpg").symlink_to(outside)
    lines = [{"source-ref": "ok.jpg", "lesion_id": "L1"}, {"source-ref": "../secret.jpg"},
             {"source-ref": str(outside)}, {"source-ref": "link.jpg"}, {"source-ref": "missing.jpg"}]
    manifest = root / "input.manifest"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(manifest), "--output", str(out),
                 "--manifest-out", str(out / "gt.manifest")]) == 0
    rows = _rows(out)
    assert [r.get("error") for r in rows] == [None, "outside_input_root", "outside_input_root", "outside_input_root",
                                              "unreadable_file", "bad_manifest_line"]
    gt = [json.loads(x) for x in (out / "gt.manifest").read_text().splitlines()]
    assert len(gt) == 1 and gt[0]["source-ref"] == "ok.jpg" and gt[0]["lesion_id"] == "L1"  # keys pass through


def test_out_of_memory_halves_the_batch(trained_run, folder50, tmp_path, caplog):
    from medpipe.batch import LocalEngine, list_items

    engine = LocalEngine(str(trained_run / "model"), "eager", "cpu", batch_size=16, workers=2)
    real = engine.predictor.probabilities
    seen = []

    def flaky(pixels, tta=False):
        seen.append(len(pixels))
        if len(pixels) > 4:
            raise torch.OutOfMemoryError("simulated")
        return real(pixels)

    engine.predictor.probabilities = flaky
    items, _ = list_items(folder50)
    items = [it for it in items if it.path.endswith(".jpg") and "broken" not in it.path][:12]
    with caplog.at_level("WARNING"):
        rows = engine.run(items, engine.submit(items))
    assert all("label" in r for r in rows) and len(rows) == 12
    assert seen[:3] == [12, 8, 4] and engine.batch_size == 4
    assert "out of memory on a batch of 12; retrying with batch size 8" in caplog.text


def test_batch_via_url_matches_local(trained_run, folder50, tmp_path):
    pytest.importorskip("fastapi")
    from tests._server import Server

    s = Server(trained_run / "model", "--backend", "eager", log=tmp_path / "log").wait_ready()
    try:
        out = tmp_path / "remote"
        assert main(["batch", "--url", s.url, "--input", str(folder50), "--output", str(out)]) == 0
        state = json.loads((out / "batch.json").read_text())
        assert state["concurrency"] == 4  # from the server's /execution-parameters
        # a manifest with patient metadata, to a model that takes the image only: the images alone, as locally
        imgs = sorted(folder50.rglob("*.jpg"))[:2]
        manifest = folder50 / "with_metadata.csv"
        manifest.write_text("path,age,sex,site\n" + "".join(f"{p.relative_to(folder50)},70,male,face\n" for p in imgs))
        assert main(["batch", "--url", s.url, "--input", str(manifest), "--output", str(tmp_path / "md")]) == 0
        with_md = {r["path"].rsplit("/", 1)[-1]: r for r in _rows(tmp_path / "md")}
    finally:
        s.stop()
    local = tmp_path / "local"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(folder50), "--output", str(local),
                 "--backend", "eager"]) == 0
    remote_rows, local_rows = _rows(out), _rows(local)
    assert [r["id"] for r in remote_rows] == [r["id"] for r in local_rows]
    for a, b in zip(remote_rows, local_rows):
        assert a.get("error") == b.get("error")
        if "label" in a:
            assert a["label"] == b["label"]
            assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 1e-5
    local_by_name = {r["path"].rsplit("/", 1)[-1]: r for r in local_rows}
    assert len(with_md) == 2 and all("label" in r for r in with_md.values())
    for name, r in with_md.items():
        assert max(abs(r["probabilities"][c] - local_by_name[name]["probabilities"][c]) for c in r["probabilities"]) < 1e-5


# -- hostile inputs and a busy server (RELIABILITY "Files, paths and labels", "Batch over HTTP") ----------


def test_per_file_names_never_leave_the_output_folder(trained_run, folder50, tmp_path, capsys):
    imgs = sorted(folder50.rglob("*.jpg"))[:3]
    manifest = folder50.parent / "ids.csv"
    pd.DataFrame({"id": ["../../../evil", str(tmp_path / "abs_evil"), "sub/fine"],
                  "path": [str(p) for p in imgs]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(manifest), "--output", str(out),
                 "--per-file", "--backend", "eager"]) == 0
    err = capsys.readouterr().err
    assert "'../../../evil' refused" in err and "abs_evil' refused" in err
    assert (out / "sub" / "fine.out").is_file()
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.out")}
    assert written == {"out/sub/fine.out"}  # nothing outside out/
    assert not (tmp_path / "abs_evil.out").exists()
    state = json.loads((out / "batch.json").read_text())
    assert [r["id"] for r in state["per_file_refused"]] == ["../../../evil", str(tmp_path / "abs_evil")]


def test_record_table_input_is_confined_to_the_ingested_root(trained_run, data_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("classes.json", "ingest_report.json"):
        shutil.copy(data_dir / name, data / name)
    table = pd.read_csv(data_dir / "records.csv", dtype=str).head(4)
    table.loc[3, "path"] = "/etc/hostname"  # one row pointing out of the dataset must not widen the root to /
    table.to_csv(data / "records.csv", index=False)
    out = tmp_path / "out"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(data), "--output", str(out),
                 "--backend", "eager"]) == 0
    rows = _rows(out)
    assert [r.get("error") for r in rows] == [None, None, None, "outside_input_root"]


def test_fifo_in_the_input_folder_is_skipped_not_waited_on(trained_run, folder50, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(folder50.rglob("*.jpg"))[:2]:
        shutil.copy(p, src / p.name)
    os.mkfifo(src / "zz_pipe.jpg")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "medpipe", "batch", "--model", str(trained_run / "model"), "--input",
                        str(src), "--output", str(out), "--backend", "eager"], capture_output=True, text=True,
                       timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(out)
    assert rows[-1]["id"] == "zz_pipe.jpg" and "FIFO" in rows[-1]["message"] and "label" in rows[0]


def test_csv_outputs_quote_and_neutralise_formulas(trained_run, folder50, tmp_path):
    import csv
    import io

    from medpipe.infer.protocol import to_csv
    from medpipe.utils import csv_text

    text = csv_text(["a", "b"], [["=1+2", "x,y"], ["@SUM(A1)", "two\nlines"], ["-cmd", 0.5]])
    assert list(csv.reader(io.StringIO(text))) == [["a", "b"], ["'=1+2", "x,y"], ["'@SUM(A1)", "two\nlines"],
                                                   ["'-cmd", "0.5"]]
    served = to_csv(["a", "b"], [{"error": "=HYPERLINK(1)"}])  # Accept: text/csv from the server
    assert list(csv.reader(io.StringIO(served)))[1][-1] == "'=HYPERLINK(1)"
    img = sorted(folder50.rglob("*.jpg"))[0]
    manifest = folder50.parent / "formula.csv"
    pd.DataFrame({"id": ["=HYPERLINK(\"http://x\",\"y\")"], "path": [str(img)]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(manifest), "--output", str(out),
                 "--backend", "eager"]) == 0
    cells = list(csv.reader(io.StringIO((out / "predictions.csv").read_text())))
    assert cells[1][0] == "'=HYPERLINK(\"http://x\",\"y\")"


def test_busy_or_missing_server_rows_are_retried_and_rerun(trained_run, folder50, tmp_path, capsys):
    """No server at all: every row stays transient, exit 75 (EX_TEMPFAIL) with the advice to rerun. The
    rerun against a real server whose queue holds one image (so it answers 503 + Retry-After to the
    other requests in flight) asks for exactly those rows again: all answered, exit 0."""
    pytest.importorskip("fastapi")
    from tests._server import Server, free_port

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(folder50.rglob("*.jpg"))[:8]:
        shutil.copy(p, src / p.name)
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["batch", "--url", dead, "--input", str(src), "--output", str(out), "--retries", "1",
                 "--concurrency", "4"]) == 75
    assert "8 rows got no answer" in capsys.readouterr().err
    assert all(r.get("transient") for r in _rows(out))
    s = Server(trained_run / "model", "--backend", "eager", "--max-queue", "1", log=tmp_path / "log",
               slow_infer_s=0.2).wait_ready()
    try:
        assert main(["batch", "--url", s.url, "--input", str(src), "--output", str(out), "--concurrency", "4"]) == 0
        metrics = s.request("GET", "/metrics")[2].decode()
    finally:
        s.stop()
    rows = _rows(out)
    assert len(rows) == 8 and all("label" in r for r in rows)
    state = json.loads((out / "batch.json").read_text())
    assert state["missing"] == 0 and state["errors"] == 0
    refused = [line for line in metrics.splitlines() if line.startswith("medpipe_requests_total")
               and 'status="503"' in line and "invocations" in line]
    assert refused and float(refused[0].split()[-1]) > 0  # the server did answer 503, and the client retried
