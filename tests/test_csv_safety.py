"""CSV row injection: every CSV medpipe writes goes through one writer (medpipe.utils.csv_text) that quotes
any cell holding a control character, so no name can end or split a row, and ids read back exactly.

File names carry every control character a POSIX file system allows (0x01-0x1F and 0x7F; NUL and '/'
cannot be in a file name), and the record ids, set through a CSV manifest's image_id column, carry all
of them plus NUL and '/', through ingest -> split -> train (densenet-test, 1 epoch, once) -> batch."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medpipe.utils import FORMULA_START, csv_text, frame_csv, read_csv_table

CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"]
FS_CONTROLS = [c for c in CONTROLS if c != "\x00"]  # what a POSIX file name may hold of them
FORMULAS = ["=1+1", "+1", "-1+1", "@SUM(A1)", "'quoted", "\tTAB", "\rCR"]
cells = st.lists(st.sampled_from(CONTROLS + FORMULAS + list("a,\"'=+-@ é\u2028\x85")), max_size=8).map("".join)


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(cells, cells), min_size=1, max_size=6), st.booleans())
def test_any_text_round_trips_through_the_one_writer(rows, neutralise):
    """Any cells, control characters and formula starts included: the same rows come back from pandas
    (the matching reader) and from the csv module; guarded cells start with an apostrophe, so a spreadsheet
    runs none of them."""
    text = csv_text(["id", "path"], [list(r) for r in rows], neutralise=neutralise)
    back = read_csv_table(io.StringIO(text), guarded=neutralise)
    assert [tuple(r) for r in back.itertuples(index=False, name=None)] == rows
    raw = _rows(text)
    assert len(raw) == len(rows) + 1 and all(len(r) == 2 for r in raw)
    if neutralise:
        for r in raw[1:]:
            assert not any(v.startswith(FORMULA_START) for v in r)


def test_carriage_return_and_formula_cannot_inject_a_row():
    """The review's case: two names, one with a bare CR before a formula, one with an ESC, stay two rows; the
    formula keeps its guard; non-text numbers are written as they are."""
    text = csv_text(["id", "n"], [["a\r=1+1", 1], ["b\x1b[31m", -2.5]])
    assert _rows(text)[1:] == [["a\r=1+1", "1"], ["b\x1b[31m", "-2.5"]]
    assert text.count("\n") == 3 and '"a\r=1+1"' in text
    assert _rows(csv_text(["id"], [["\r=1+1"]]))[1] == ["'\r=1+1"]


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _dataset(root: Path, ids: list[str]) -> Path:
    """Images whose file names hold every control character a file system allows, and a CSV manifest (written
    by the one writer) giving each its id; two classes alternating."""
    root.mkdir(parents=True)
    rows = []
    for k, image_id in enumerate(ids):
        c = FS_CONTROLS[k % len(FS_CONTROLS)]
        name = f"{c}img{k}{c}=x.jpg"
        (root / name).write_bytes(_jpeg(k))
        rows.append([name, ("benign", "malignant")[k % 2], image_id])
    (root / "manifest.csv").write_text(csv_text(["path", "label", "image_id"], rows, neutralise=False))
    return root / "manifest.csv"


def _ids(n: int) -> list[str]:
    """Every control character (NUL included) and '/', at the start, inside and at the end, and formula starts."""
    out = []
    for k in range(n):
        c = CONTROLS[k % len(CONTROLS)]
        out.append(f"{c}{FORMULAS[k % len(FORMULAS)]}/{k}{c}" if k % 3 else f"{c}id{k}\x00{c}")
    return out


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    """ingest -> split -> train (once) on names with every control character."""
    from medpipe.cli import main
    from medpipe.data.sources import ingest, load_records
    from medpipe.data.splits import ensure_splits
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("ctrl")
    ids = _ids(2 * len(CONTROLS))
    manifest = _dataset(tmp / "src", ids)
    data = tmp / "data"
    report = ingest(manifest, data, workers=1)
    assert report["records"] == len(ids), report["defects"]
    table, _ = load_records(data)
    splits, _ = ensure_splits(data)
    epochs = TINY.index("--epochs")
    args = TINY[:epochs] + ["--epochs", "1"] + TINY[epochs + 2:] + ["--bootstrap", "10"]
    assert main(["train", "--data", str(data), "--out", str(tmp / "run"), *args]) == 0
    return tmp, ids, data, table, splits


def test_ids_and_names_round_trip_ingest_split_train(control_run):
    from medpipe.data.splits import ensure_splits

    tmp, ids, data, table, splits = control_run
    assert sorted(table["image_id"]) == sorted(ids)
    names = {Path(p).name for p in table["path"]}
    assert {n[0] for n in names} == set(FS_CONTROLS)  # every file-system control character is in a name
    assert all((tmp / "src" / n).is_file() for n in names)
    raw = _rows((data / "records.csv").read_text())
    assert len(raw) == len(ids) + 1 and len({len(r) for r in raw}) == 1
    assert sorted(splits["image_id"]) == sorted(ids)
    again, reused = ensure_splits(data)  # read back from splits.csv with the matching reader
    assert reused and again.equals(splits)
    assert len(_rows((data / "splits.csv").read_text())) == len(ids) + 1


def test_batch_csv_and_jsonl_keep_every_id_and_path(control_run):
    from medpipe.batch import run_batch

    tmp, ids, data, table, _ = control_run
    out = tmp / "batch"
    summary = run_batch(str(tmp / "run" / "model"), str(data), str(out), workers=1, backend="eager")
    assert summary["errors"] == 0, summary
    csv_back = read_csv_table(out / "predictions.csv", guarded=True)
    jsonl = [json.loads(x) for x in (out / "predictions.jsonl").read_text().split("\n") if x]
    expected = sorted(zip(table["image_id"], table["path"]))
    assert sorted(zip(csv_back["id"], csv_back["path"])) == expected
    assert sorted((r["id"], r["path"]) for r in jsonl) == expected
    assert len(_rows((out / "predictions.csv").read_text())) == len(ids) + 1
    assert set(csv_back["label"]) <= {"benign", "malignant"}


def test_evaluate_predictions_keep_every_id(control_run):
    """medpipe evaluate's predictions.csv (the formula-guarded writer) over all the records."""
    from medpipe.cli import main

    tmp, ids, data, _, _ = control_run
    assert main(["evaluate", "--model", str(tmp / "run" / "model"), "--data", str(data), "--split", "all",
                 "--out", str(tmp / "eval"), "--bootstrap", "0", "--backend", "eager"]) == 0
    back = read_csv_table(tmp / "eval" / "predictions.csv", guarded=True)
    assert sorted(back["image_id"]) == sorted(ids)
    assert len(_rows((tmp / "eval" / "predictions.csv").read_text())) == len(ids) + 1


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.text(alphabet=st.sampled_from(FS_CONTROLS + list("ab=+-@'.")), min_size=1, max_size=6)
                .filter(lambda s: not s.startswith(".") and s.strip(" ") == s), min_size=1, max_size=3, unique=True))
def test_drawn_file_names_round_trip_ingest_to_batch(control_run, tmp_path_factory, stems):
    """Drawn names (control characters, formula starts, apostrophes) in a class-folder dataset: ingest's
    records.csv and a batch with the trained package give each name back unchanged, one row each."""
    from medpipe.batch import run_batch
    from medpipe.data.sources import ingest, load_records

    tmp = tmp_path_factory.mktemp("drawn")
    for k, stem in enumerate(stems):
        folder = tmp / "src" / ("benign", "malignant")[k % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.jpg").write_bytes(_jpeg(k))
    ingest(tmp / "src", tmp / "data", workers=1, classes=["benign", "malignant"])
    table, _ = load_records(tmp / "data")
    assert sorted(table["image_id"]) == sorted(stems)
    run_batch(str(control_run[0] / "run" / "model"), str(tmp / "data"), str(tmp / "out"), workers=1,
              backend="eager")
    back = read_csv_table(tmp / "out" / "predictions.csv", guarded=True)
    assert sorted(back["id"]) == sorted(stems) and len(_rows((tmp / "out" / "predictions.csv").read_text())) == len(stems) + 1


def test_frame_csv_writes_missing_values_empty_and_numbers_plain():
    import pandas as pd

    frame = pd.DataFrame({"a": ["x", None, "NA"], "b": [1.5, float("nan"), -3.0], "c": [1, 2, 3],
                          "d": [[1, 2], [], "=cmd"]})  # optuna's trials table holds lists
    text = frame_csv(frame)
    assert text == 'a,b,c,d\nx,1.5,1,"[1, 2]"\n,,2,[]\nNA,-3.0,3,=cmd\n'
    assert frame_csv(frame, neutralise=True).endswith("NA,-3.0,3,'=cmd\n")
    assert read_csv_table(io.StringIO(text))["a"].tolist() == ["x", "", "NA"]


def test_a_file_name_that_is_not_utf8_is_reported_not_a_crash(tmp_path):
    """Bytes that are not UTF-8 in a file name (Linux allows them) made ingest and batch end in 'internal
    error: UnicodeEncodeError' (no CSV or JSON can hold such a name); now that file is a defect / error row
    naming it (``\\xNN``) and the others are processed."""
    import os

    from medpipe.batch import list_items
    from medpipe.data.sources import ingest, load_records

    src = tmp_path / "src"
    for k, cls in enumerate(("benign", "malignant") * 2):
        (src / cls).mkdir(parents=True, exist_ok=True)
        (src / cls / f"ok{k}.jpg").write_bytes(_jpeg(k))
    try:
        with open(os.path.join(os.fsencode(src / "benign"), b"bad\xff\x1b.jpg"), "wb") as f:
            f.write(_jpeg(9))
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    report = ingest(src, tmp_path / "data", workers=1, classes=["benign", "malignant"])
    assert report["records"] == 4 and len(load_records(tmp_path / "data")[0]) == 4
    assert [(d["item"], d["reason"]) for d in report["defects"]] == [("benign/bad\\xff\x1b.jpg", "bad_file_name")]
    items, _ = list_items(src / "benign")
    assert [(it.id, it.error[0] if it.error else None) for it in items] == [
        ("bad\\xff\x1b.jpg", "bad_file_name"), ("ok0.jpg", None), ("ok2.jpg", None)]
