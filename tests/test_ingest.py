import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from medpipe.cli import main
from medpipe.data.sources import IngestError, ingest, load_records, safe_extract


def _ids_labels(data_dir):
    table, classes = load_records(data_dir)
    return dict(zip(table["image_id"], table["label"])), dict(zip(table["image_id"], table["group_id"])), classes


def test_synth_layout(synth_dir):
    meta = pd.read_csv(synth_dir / "HAM10000_metadata.csv")
    assert list(meta.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert set(meta["dx"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert meta["image_id"].str.fullmatch(r"ISIC_00\d{5}").all()
    assert meta["lesion_id"].nunique() < len(meta)  # some lesions have several images
    files = sorted((synth_dir / "HAM10000_images_part_1").glob("*.jpg")) + \
        sorted((synth_dir / "HAM10000_images_part_2").glob("*.jpg"))
    assert len(files) == len(meta) and all(len(list((synth_dir / f"HAM10000_images_part_{p}").glob("*.jpg"))) for p in (1, 2))
    assert (meta["dx"] == "nv").mean() > 0.5


def test_synth_deterministic(tmp_path):
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    for name in ("a", "b"):
        write_synthetic(tmp_path / name, SynthSpec(count=14, width=32, height=24, seed=9), workers=1)
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_four_defects_reported_and_rest_kept(synth_copy, tmp_path):
    meta_path = synth_copy / "HAM10000_metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    ids = list(meta["image_id"])
    truncated, missing, unknown, dup = ids[0], ids[1], ids[2], ids[3]
    jpg = next(synth_copy.rglob(f"{truncated}.jpg"))
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    next(synth_copy.rglob(f"{missing}.jpg")).unlink()
    meta.loc[meta["image_id"] == unknown, "dx"] = "freckle"
    meta = pd.concat([meta, meta[meta["image_id"] == dup]])
    meta.to_csv(meta_path, index=False)

    rc = main(["ingest", str(synth_copy), "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    reasons = sorted((d["reason"], d["item"]) for d in report["defects"])
    assert len(reasons) == 4
    got = {r for r, _ in reasons}
    assert got == {"corrupt_image", "missing_file", "unknown_label", "duplicate_id"}
    items = " ".join(i for _, i in reasons)
    for image_id in (truncated, missing, unknown, dup):
        assert image_id in items
    assert all(d["detail"] for d in report["defects"])
    table, _ = load_records(tmp_path / "out")
    assert len(table) == len(ids) - 3
    assert not {truncated, missing, unknown} & set(table["image_id"])


def test_same_images_from_every_format(synth_dir, tmp_path):
    ingest(synth_dir, tmp_path / "official", workers=1)
    labels, groups, classes = _ids_labels(tmp_path / "official")

    ingest(synth_dir / "dataverse_files.zip", tmp_path / "dv", workers=1)
    assert _ids_labels(tmp_path / "dv") == (labels, groups, classes)

    table, _ = load_records(tmp_path / "official")
    folders = tmp_path / "folders"
    for rec in table.itertuples():
        (folders / rec.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folders / rec.label / Path(rec.path).name)
    ingest(folders, tmp_path / "fo", workers=1)
    fl, _, fcls = _ids_labels(tmp_path / "fo")
    assert fl == labels and fcls == classes  # all 7 classes present, same sorted order

    # Ground Truth manifest with s3:// references mapped to a local root, lesion ids passed through
    s3root = tmp_path / "s3"
    (s3root / "bucket" / "imgs").mkdir(parents=True)
    lines = []
    for rec in table.itertuples():
        shutil.copy(rec.path, s3root / "bucket" / "imgs" / Path(rec.path).name)
        lines.append(json.dumps({"source-ref": f"s3://bucket/imgs/{Path(rec.path).name}", "skin-label": rec.class_index,
                                 "skin-label-metadata": {"class-name": rec.label, "confidence": 0.9,
                                                         "type": "groundtruth/image-classification"},
                                 "lesion_id": rec.group_id}))
    manifest = tmp_path / "gt.manifest"
    manifest.write_text("\n".join(lines) + "\n")
    ingest(manifest, tmp_path / "gt", s3_root=str(s3root), workers=1)
    assert _ids_labels(tmp_path / "gt") == (labels, groups, classes)

    # CSV manifest path,label,group (paths relative to its folder: rows outside it are refused)
    csv = folders / "m.csv"
    rel = [f"{lab}/{Path(p).name}" for p, lab in zip(table["path"], table["label"])]
    pd.DataFrame({"path": rel, "label": table["label"], "group": table["group_id"]}).to_csv(csv, index=False)
    ingest(csv, tmp_path / "csv", workers=1)
    cl, cg, _ = _ids_labels(tmp_path / "csv")
    assert cl == labels and cg == groups

    # same file hashes everywhere
    assert set(load_records(tmp_path / "gt")[0]["sha256"]) == set(table["sha256"])


def test_gt_file_refs_and_bad_lines(synth_dir, tmp_path):
    table, _ = load_records_from(synth_dir, tmp_path)
    rows = table.head(3)
    lines = [json.dumps({"source-ref": "file://" + r.path, "lbl": r.class_index,
                         "lbl-metadata": {"class-name": r.label}}) for r in rows.itertuples()]
    lines += ["{not json", json.dumps({"source-ref": "https://example.com/x.jpg", "lbl": 0,
                                       "lbl-metadata": {"class-name": "akiec"}})]
    m = tmp_path / "x.jsonl"
    m.write_text("\n".join(lines))
    rep = ingest(m, tmp_path / "o", workers=1)
    assert rep["records"] == 3
    assert sorted(d["reason"] for d in rep["defects"]) == ["bad_json", "bad_source_ref"]


def load_records_from(src, tmp_path):
    ingest(src, tmp_path / "base", workers=1)
    return load_records(tmp_path / "base")


def test_orphan_file_and_zero_byte(synth_copy, tmp_path):
    (synth_copy / "HAM10000_images_part_1" / "ISIC_9999999.jpg").write_bytes(b"\xff\xd8junk")
    first = next((synth_copy / "HAM10000_images_part_2").glob("*.jpg"))
    first.write_bytes(b"")
    rep = ingest(synth_copy, tmp_path / "o", workers=2)
    reasons = {d["reason"]: d for d in rep["defects"]}
    assert set(reasons) == {"orphan_file", "empty_image"}
    assert "ISIC_9999999" in reasons["orphan_file"]["item"]
    assert first.stem in reasons["empty_image"]["item"]


def test_nothing_usable_exits_nonzero(tmp_path, capsys):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"not a jpeg")
    rc = main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "no usable images" in err and "Traceback" not in err


def test_strict_fails_on_defect(synth_copy, tmp_path, capsys):
    next(synth_copy.rglob("*.jpg")).unlink()
    assert main(["ingest", str(synth_copy), "--out", str(tmp_path / "o"), "--strict"]) != 0
    assert "strict" in capsys.readouterr().err
    assert (tmp_path / "o" / "ingest_report.json").is_file()


def _zip_with(path, name, data=b"x", symlink=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, data)


@pytest.mark.parametrize("name,symlink", [("/abs/evil.txt", False), ("../evil.txt", False),
                                          ("a/../../evil.txt", False), ("link", True)])
def test_hostile_archives_rejected(tmp_path, name, symlink):
    z = tmp_path / "h.zip"
    _zip_with(z, name, data=b"/etc/passwd" if symlink else b"x", symlink=symlink)
    target = tmp_path / "t" / "inner"
    with pytest.raises(IngestError):
        safe_extract(z, target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "t" / "evil.txt").exists()
    assert not target.exists() or not any(target.iterdir())  # nothing written at all


def test_hostile_dataverse_zip_via_cli(tmp_path, capsys):
    z = tmp_path / "dataverse_files.zip"
    _zip_with(z, "../../escape.txt")
    assert main(["ingest", str(z), "--out", str(tmp_path / "o")]) != 0
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "escape.txt").exists()


# -- hostile files, paths and labels (RELIABILITY "Files, paths and labels") ------------------------------


def _csv_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    path = folder / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def test_unsafe_class_names_refused_at_ingest_naming_the_row(synth_dir, tmp_path, capsys):
    from medpipe.data.sources import class_name_problem

    jpgs = sorted(synth_dir.rglob("*.jpg"))[:6]
    src = tmp_path / "src"
    src.mkdir()
    for p in jpgs:
        shutil.copy(p, src / p.name)
    labels = ["nv", "mel", "$__import__('os').system('touch pwned')", "=HYPERLINK(\"http://x\")", "a,b\nc", "@SUM(A1)"]
    manifest = _csv_manifest(src, [(p.name, lab) for p, lab in zip(jpgs, labels)])
    rep = ingest(manifest, tmp_path / "o", workers=1)
    unsafe = {d["item"]: d["detail"] for d in rep["defects"] if d["reason"] == "unsafe_class_name"}
    assert set(unsafe) == {p.stem for p in jpgs[2:]}  # each refused row is named
    assert json.loads((tmp_path / "o" / "classes.json").read_text()) == ["mel", "nv"]
    assert not (tmp_path / "pwned").exists()
    # the documented rule
    assert class_name_problem("basal cell carcinoma (BCC)") is None and class_name_problem("Mélanome-2") is None
    for bad in ("-1", "+x", "a\tb", "x" * 65, " nv", "nv "):
        assert class_name_problem(bad), bad
    # --classes is held to the same rule
    assert main(["ingest", str(manifest), "--out", str(tmp_path / "o2"), "--classes", "nv,=cmd"]) == 2
    assert "--classes: class name '=cmd'" in capsys.readouterr().err


def test_files_and_symlinks_outside_the_dataset_root_are_refused(synth_dir, tmp_path):
    jpgs = sorted(synth_dir.rglob("*.jpg"))[:4]
    root = tmp_path / "root"
    (root / "nv").mkdir(parents=True)
    (root / "mel").mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    for p in jpgs:
        shutil.copy(p, outside / p.name)
    shutil.copy(jpgs[0], root / "nv" / "a.jpg")
    shutil.copy(jpgs[1], root / "mel" / "b.jpg")
    (root / "nv" / "c.jpg").symlink_to(outside / jpgs[2].name)  # a link out of the root
    rep = ingest(root, tmp_path / "o1", workers=1, fmt="folders")
    assert [(d["item"], d["reason"]) for d in rep["defects"]] == [("c", "outside_root")]
    assert rep["records"] == 2
    # a CSV manifest: rows with '..' or an absolute path outside the manifest's folder
    manifest = _csv_manifest(root, [("nv/a.jpg", "nv"), ("mel/b.jpg", "mel"), (f"../secret/{jpgs[2].name}", "nv"),
                                    (str(outside / jpgs[3].name), "mel")])
    rep = ingest(manifest, tmp_path / "o2", workers=1)
    assert sorted(d["reason"] for d in rep["defects"]) == ["outside_root", "outside_root"]
    assert rep["records"] == 2


def test_zip_bomb_refused_before_writing(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("HAM10000_metadata.csv", b"lesion_id,image_id,dx\n")
        zf.writestr("images/huge.jpg", b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(IngestError, match="zip bomb"):
        safe_extract(bomb, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    # the total cap (a documented option of safe_extract; the default is MAX_UNPACKED_BYTES)
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("a.txt", b"x" * 5000)
    with pytest.raises(IngestError, match="over the 4096-byte limit"):
        safe_extract(plain, tmp_path / "t2", max_bytes=4096)
    assert not (tmp_path / "t2").exists()
    assert main(["ingest", str(bomb), "--out", str(tmp_path / "o")]) == 2


def test_fifo_sparse_and_device_files_skipped_with_a_reason(synth_dir, tmp_path):
    import os

    root = tmp_path / "root"
    (root / "nv").mkdir(parents=True)
    (root / "mel").mkdir()
    jpgs = sorted(synth_dir.rglob("*.jpg"))[:2]
    shutil.copy(jpgs[0], root / "nv" / "a.jpg")
    shutil.copy(jpgs[1], root / "mel" / "b.jpg")
    os.mkfifo(root / "nv" / "pipe.jpg")  # opening it would block until a writer comes: never opened
    with open(root / "mel" / "sparse.jpg", "wb") as fh:
        fh.truncate(3 << 30)  # 3 GB, no blocks on disk: refused by its size, never read
    rep = ingest(root, tmp_path / "o", workers=1, fmt="folders")
    reasons = {d["item"]: (d["reason"], d["detail"]) for d in rep["defects"]}
    assert reasons["pipe"][0] == "not_a_regular_file" and "FIFO" in reasons["pipe"][1]
    assert reasons["sparse"][0] == "file_too_large"
    assert rep["records"] == 2


def test_error_codes_come_from_the_error_not_its_wording(tmp_path):
    """An S3 object ingest could not copy is a missing or an unreadable file by the error's kind, and a batch
    reference refused for leaving its root by the exception's type: rewording a message changes no code."""
    from medpipe.batch import _confine
    from medpipe.data.sources import Candidates, _new_existing_file
    from medpipe.errors import StorageError

    cand = Candidates(rows=[])
    for kind in ("missing", "denied", "too_large", None):
        error = StorageError("s3://b/k.jpg: worded in any way", kind=kind)
        assert not _new_existing_file(cand, set(), "line", f"id-{kind}", tmp_path / "absent.jpg", "s3://b/k.jpg",
                                      error)
    assert [d.reason for d in cand.defects] == ["missing_file"] + ["unreadable_file"] * 3
    assert all(d.detail == "s3://b/k.jpg: worded in any way" for d in cand.defects)
    s3_root = tmp_path / "s3"
    s3_root.mkdir()
    assert _confine("s3://b/%2E%2E/x.jpg", tmp_path, tmp_path, s3_root)[1][0] == "outside_input_root"
    assert _confine("s3://b/x.jpg", tmp_path, tmp_path, None)[1][0] == "unsupported_reference"  # no --s3-root
    assert _confine("http://host/x.jpg", tmp_path, tmp_path, s3_root)[1][0] == "unsupported_reference"


def test_streamed_hash_with_a_cap(tmp_path):
    from medpipe.utils import sha256_file

    p = tmp_path / "f"
    p.write_bytes(b"a" * 3000)
    import hashlib

    assert sha256_file(p) == hashlib.sha256(b"a" * 3000).hexdigest()
    with pytest.raises(ValueError, match="limit"):
        sha256_file(p, max_bytes=1000)
