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

    # CSV manifest path,label,group
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": table["path"], "label": table["label"], "group": table["group_id"]}).to_csv(csv, index=False)
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
