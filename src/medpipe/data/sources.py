"""Readers for every supported input format, all producing one validated record table.

Formats (``detect_format`` picks one when not given):

- ``ham10000``   a folder with ``HAM10000_metadata[.csv]`` and images in any subfolder;
- ``dataverse``  ``dataverse_files.zip`` (two image zips + metadata), extracted safely;
- ``folders``    ``root/<class>/*.jpg``;
- ``groundtruth`` a SageMaker Ground Truth augmented manifest (JSON Lines);
- ``csv``        a CSV manifest with ``path,label[,group]`` (an ISIC export's metadata columns may sit beside).

Patient metadata (:mod:`medpipe.data.metadata`) is kept as the columns ``age``, ``sex`` and ``site``, read
from HAM10000's ``age, sex, localization``, ISIC's ``age_approx, sex, anatom_site_general`` or the columns
``metadata_columns`` maps (``age=patient_age,site=location``); a column that says how the label was obtained
(``dx_type``) cannot be mapped.

Every reader returns *candidates* (one per labelled row) and *defects*; :func:`ingest` then hashes
and fully decodes every candidate in parallel, drops the bad ones with a reason, and writes
``records.csv``, ``classes.json`` and ``ingest_report.json`` into the data directory.

Hostile inputs are refused with a reason, never followed: files and symlinks that resolve outside the
dataset root (the source folder, or a manifest's folder), FIFOs/devices/sockets (never opened, so never
a hang), files over ``max_file_mb`` (checked before reading; hashing is streamed), archives whose members
inflate past ``MAX_UNPACKED_BYTES`` in total or ``MAX_ZIP_RATIO`` times their compressed size, and class
names outside the safe set (:func:`class_name_problem`), so a label never becomes code or a formula in a
bundle config, a spreadsheet or a CSV.

A Ground Truth manifest on S3 (or one naming ``s3://`` objects, without ``--s3-root``) is copied with the objects
it names into ``OUT/s3/<bucket>/<key>`` (:func:`fetch_groundtruth`), then read as a local one.

Size: over 650 lines because every reader shares the one confinement and defect model; splitting the readers
from it would scatter the rules a hostile input is checked against.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import unquote, urlparse

import pandas as pd

from medpipe.errors import IngestError, StorageError
from medpipe.data import imageio, s3
from medpipe.data.metadata import FIELDS as METADATA_FIELDS, keep_metadata, parse_mapping
from medpipe.data.synthetic import HAM_CLASSES
from medpipe.utils import atomic_write_json, atomic_write_text, frame_csv, read_csv_table, shown_name

# The one list of input file types: suffix -> media type sent to a server (batch --url, predict --url).
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".webp": "image/webp", ".dcm": "application/dicom"}
IMAGE_SUFFIXES = frozenset(s for s in MEDIA_TYPES if s != ".dcm")  # what ingest reads (no DICOM training yet)
MAX_FILE_MB = 256           # a 40 MP image is far below this; a 3 GB sparse file is refused unread
MAX_UNPACKED_BYTES = 16 << 30  # an archive may inflate to at most this (HAM10000's dataverse zip: ~2.7 GB)
MAX_ZIP_RATIO = 100         # per member: uncompressed / compressed (JPEGs ~1, CSVs ~10, a bomb ~1000)
CLASS_NAME_MAX = 64
CLASS_NAME_PUNCT = " _-.()"
RECORDS_FILE = "records.csv"
CLASSES_FILE = "classes.json"
REPORT_FILE = "ingest_report.json"
S3_MIRROR = "s3"  # OUT/s3/<bucket>/<key>: the objects of an s3:// Ground Truth manifest, copied by ingest
FORMATS = ("auto", "ham10000", "dataverse", "folders", "groundtruth", "csv")
BASE_COLUMNS = ["image_id", "path", "label", "class_index", "group_id", "sha256", "width", "height"]


@dataclass
class Defect:
    item: str
    reason: str
    detail: str = ""

    def __post_init__(self):
        self.item = shown_name(self.item)  # a file name that is not UTF-8 is reported, not a crash

    def as_dict(self) -> dict:
        return {"item": self.item, "reason": self.reason, "detail": self.detail}


@dataclass
class Candidates:
    rows: list[dict]  # image_id, path, label, group_id, + extra metadata
    defects: list[Defect] = field(default_factory=list)
    classes: list[str] | None = None  # fixed class list (HAM10000) or None to infer
    fmt: str = ""
    label_attribute: str | None = None  # Ground Truth: the attribute the labels came from


# --------------------------------------------------------------------------- class vocabulary


def class_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe class name, or None. The safe set: 1-64 characters, letters and digits
    (any script), space, ``_ - . ( )``, starting with a letter or digit, no leading/trailing space.
    Nothing else, so a name never starts a spreadsheet formula (``= + - @``), never splits a CSV cell
    (``,``, quotes, newlines) and never means anything to a MONAI bundle config (``$ @ % #``)."""
    if not isinstance(name, str) or not name:
        return "empty class name"
    if len(name) > CLASS_NAME_MAX:
        return f"class name longer than {CLASS_NAME_MAX} characters"
    if not name[0].isalnum():
        return f"class name {name!r} must start with a letter or digit"
    bad = sorted({ch for ch in name if not (ch.isalnum() or ch in CLASS_NAME_PUNCT)})
    if bad:
        return f"class name {name!r} has characters outside the safe set: {''.join(bad)!r}"
    if name != name.strip():
        return f"class name {name!r} has leading or trailing space"
    return None


class FileProblem(NamedTuple):
    """Why a file must not be opened: ``code`` (``unreadable_file``, ``not_a_regular_file``, ``file_too_large``)
    and ``reason`` (words for the user)."""

    code: str
    reason: str


class RefusedReference(ValueError):
    """A manifest reference that would lead outside its root (``..``, absolute parts, a symlink elsewhere)."""


def file_problem(path: str | os.PathLike, max_bytes: int | None = None) -> FileProblem | None:
    """Why ``path`` must not be opened as an input file (not a regular file: a FIFO would block the
    reader forever; over the size cap), or None. Follows symlinks, never opens the file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return FileProblem("unreadable_file", f"cannot read file ({exc.strerror})")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
        return FileProblem("not_a_regular_file", f"{kind}, not a regular file; skipped")
    if max_bytes is not None and st.st_size > max_bytes:
        return FileProblem("file_too_large", f"{st.st_size} bytes is over the {max_bytes}-byte file limit")
    return None


def regular_file_problem(path: str | os.PathLike, max_bytes: int | None = None) -> str | None:
    """:func:`file_problem`'s reason, or None."""
    problem = file_problem(path, max_bytes)
    return None if problem is None else problem.reason


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


# --------------------------------------------------------------------------- safe extraction


def safe_extract(zip_path: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_UNPACKED_BYTES,
                 max_ratio: float = MAX_ZIP_RATIO) -> list[Path]:
    """Extract ``zip_path`` into ``dest``; refuse absolute paths, ``..`` and symlink members, and a bomb:
    members declaring more than ``max_bytes`` in total or a member over ``max_ratio`` x its compressed size.

    The whole archive is checked before anything is written, so a hostile archive writes nothing; while
    writing, no member may inflate past its declared size (the check cannot be lied to).
    """
    dest = Path(dest).resolve()
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise IngestError(f"{zip_path}: members inflate to {total} bytes, over the {max_bytes}-byte limit; "
                              "archive refused (a zip bomb, or raise the limit)")
        for m in members:
            if m.file_size > max(m.compress_size, 1) * max_ratio and m.file_size > 1 << 20:
                raise IngestError(f"{zip_path}: member {m.filename!r} inflates {m.file_size / max(m.compress_size, 1):.0f}"
                                  f"x (limit {max_ratio:g}x); archive refused (a zip bomb)")
        for m in members:
            name = m.filename
            p = PurePosixPath(name.replace("\\", "/"))
            mode = (m.external_attr >> 16) & 0xFFFF
            if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                raise IngestError(f"{zip_path}: member {name!r} has an absolute path; archive refused")
            if ".." in p.parts:
                raise IngestError(f"{zip_path}: member {name!r} escapes the target with '..'; archive refused")
            if stat.S_ISLNK(mode):
                raise IngestError(f"{zip_path}: member {name!r} is a symbolic link; archive refused")
            target = (dest / p).resolve()
            if target != dest and dest not in target.parents:
                raise IngestError(f"{zip_path}: member {name!r} resolves outside the target; archive refused")
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for m in members:
            target = dest / PurePosixPath(m.filename.replace("\\", "/"))
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                left = m.file_size
                while chunk := src.read(min(1 << 20, left + 1)):
                    left -= len(chunk)
                    if left < 0:
                        raise IngestError(f"{zip_path}: member {m.filename!r} inflates past its declared size; "
                                          "archive refused")
                    dst.write(chunk)
            written.append(target)
    return written


# --------------------------------------------------------------------------- readers


def _find_images(root: Path) -> list[Path]:
    """Image-named entries under ``root`` (not following directory links); what they are is checked later."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                  and not p.name.startswith("."))


def _find_metadata(root: Path) -> Path | None:
    for name in ("HAM10000_metadata.csv", "HAM10000_metadata"):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    return None


def read_ham10000(root: Path) -> Candidates:
    meta_path = _find_metadata(root)
    if meta_path is None:
        raise IngestError(f"{root}: no HAM10000_metadata(.csv) found")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    missing_cols = {"image_id", "dx", "lesion_id"} - set(meta.columns)
    if missing_cols:
        raise IngestError(f"{meta_path}: missing columns {sorted(missing_cols)}")
    images: dict[str, list[Path]] = {}
    for p in _find_images(root):
        images.setdefault(p.stem, []).append(p)
    cand = Candidates(rows=[], classes=list(HAM_CLASSES), fmt="ham10000")
    seen: set[str] = set()
    extra_cols = [c for c in meta.columns if c not in ("image_id", "dx", "lesion_id")]
    for line_no, rec in enumerate(meta.to_dict("records"), start=2):
        image_id = rec["image_id"].strip()
        where = f"{meta_path.name} line {line_no} ({image_id or 'no image_id'})"
        if not image_id:
            cand.defects.append(Defect(where, "missing_image_id", "empty image_id"))
            continue
        if image_id in seen:
            cand.defects.append(Defect(where, "duplicate_id", f"image_id {image_id} already listed"))
            continue
        seen.add(image_id)
        paths = images.get(image_id)
        if not paths:
            cand.defects.append(Defect(where, "missing_file", f"no file {image_id}.jpg under {root.name}/"))
            continue
        if len(paths) > 1:
            cand.defects.append(Defect(where, "duplicate_file",
                                       f"{len(paths)} files named {image_id}.*; using {paths[0].relative_to(root)}"))
        row = {"image_id": image_id, "path": str(paths[0].resolve()), "label": rec["dx"].strip(),
               "group_id": rec["lesion_id"].strip() or image_id}
        row.update({c: rec[c] for c in extra_cols})
        cand.rows.append(row)
    for image_id in sorted(set(images) - seen):
        for p in images[image_id]:
            cand.defects.append(Defect(str(p.relative_to(root)), "orphan_file", "image file has no metadata row"))
    return cand


def read_dataverse(zip_path: Path, workdir: Path) -> Candidates:
    target = workdir / "extracted"
    if target.exists():
        shutil.rmtree(target)
    safe_extract(zip_path, target)
    for inner in sorted(target.rglob("*.zip")):
        safe_extract(inner, inner.with_suffix(""))
        inner.unlink()
    cand = read_ham10000(target)
    cand.fmt = "dataverse"
    return cand


def read_folders(root: Path) -> Candidates:
    cand = Candidates(rows=[], fmt="folders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise IngestError(f"{root}: no class subfolders found")
    seen: dict[str, Path] = {}
    for cls in classes:
        for p in _find_images(root / cls):
            if shown_name(str(p)) != str(p):
                cand.defects.append(Defect(str(p.relative_to(root)), "bad_file_name", "the path is not valid UTF-8 "
                                           "(rename it)"))
                continue
            image_id = p.stem
            if image_id in seen:
                cand.defects.append(Defect(str(p.relative_to(root)), "duplicate_id",
                                           f"image_id {image_id} already found at {seen[image_id].relative_to(root)}"))
                continue
            seen[image_id] = p
            cand.rows.append({"image_id": image_id, "path": str(p.resolve()), "label": cls, "group_id": image_id})
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            cand.defects.append(Defect(p.name, "orphan_file", "image outside any class folder"))
    return cand


def s3_path(ref: str, s3_root: Path | None) -> Path:
    """``s3://bucket/key`` -> ``s3_root/bucket/key``, confined to ``s3_root``: the key is URL-decoded
    first (``%2F`` is a slash, ``%2E%2E`` is ``..``), then absolute keys, ``..`` and empty parts are
    refused, and the resolved file (symlinks followed) must still lie under ``s3_root`` (both
    :class:`RefusedReference`; a ValueError without ``s3_root``)."""
    if s3_root is None:
        raise ValueError(f"{ref}: s3:// reference but no --s3-root given to map buckets onto a local folder")
    parsed = urlparse(ref)
    bucket, key = unquote(parsed.netloc), unquote(parsed.path)[1:]
    parts = [bucket, *key.split("/")]
    if "\\" in bucket + key or "\0" in bucket + key or any(x in ("", ".", "..") for x in parts) or "/" in bucket:
        raise RefusedReference(f"{ref}: the bucket/key must be a plain relative path (no '..', '.', empty or "
                               "absolute parts, also when URL-encoded); refused")
    root = Path(os.path.realpath(s3_root))
    path = root.joinpath(*parts)
    if not Path(os.path.realpath(path)).is_relative_to(root):
        raise RefusedReference(f"{ref}: resolves outside --s3-root (a symlink under it points elsewhere); refused")
    return path


def resolve_ref(ref: str, base: Path, s3_root: Path | None) -> Path:
    """Map a manifest reference (local path, file:// URL or s3://bucket/key) to a local path."""
    if ref.startswith("s3://"):
        return s3_path(ref, s3_root)
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    if "://" in ref:
        raise ValueError(f"{ref}: only local paths, file:// and s3:// (with --s3-root) are supported")
    p = Path(ref)
    return p if p.is_absolute() else base / p


def label_attributes(obj: dict) -> list[str]:
    """Label attributes of a Ground Truth line: keys ``X`` with an ``X-metadata`` object beside them.
    A chained job (a labelling job run on another job's output manifest) has several."""
    return [k[: -len("-metadata")] for k in obj
            if k.endswith("-metadata") and isinstance(obj[k], dict) and k[: -len("-metadata")] in obj]


def choose_label_attribute(manifest: Path, label_attribute: str | None) -> str | None:
    """The attribute to train on: the given one, or the only one the manifest has. A manifest with
    several (chained jobs) and none given is refused, naming them; the choice goes into the report."""
    if label_attribute:
        return label_attribute
    found: dict[str, int] = {}
    with open(manifest, encoding="utf-8") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                for a in label_attributes(obj):
                    found[a] = found.get(a, 0) + 1
    if len(found) > 1:
        listed = ", ".join(f"{a!r} ({n} lines)" for a, n in sorted(found.items()))
        raise IngestError(f"{manifest}: a chained Ground Truth manifest with several label attributes ({listed}); "
                          "choose one with --label-attribute (hyperparameter label-attribute in SageMaker)")
    return next(iter(found), None)


def read_groundtruth(manifest: Path, s3_root: Path | None, label_attribute: str | None,
                     unfetched: dict[str, StorageError] | None = None) -> Candidates:
    """Candidates of a Ground Truth manifest; ``unfetched``: why an object could not be copied from S3, per
    reference (:func:`fetch_groundtruth`)."""
    label_attribute = choose_label_attribute(manifest, label_attribute)
    cand = Candidates(rows=[], fmt="groundtruth", label_attribute=label_attribute)
    index_to_name: dict[int, str] = {}
    seen: set[str] = set()
    with open(manifest, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            where = f"{manifest.name} line {line_no}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                cand.defects.append(Defect(where, "bad_json", str(exc)[:100]))
                continue
            ref = obj.get("source-ref")
            if not isinstance(ref, str):
                cand.defects.append(Defect(where, "missing_source_ref", "no 'source-ref' string"))
                continue
            attr = label_attribute
            if attr is None or attr not in obj:
                cand.defects.append(Defect(where, "missing_label", f"no label attribute {attr!r}" if attr else
                                           "no label attribute with a -metadata object"))
                continue
            meta = obj.get(f"{attr}-metadata") or {}
            value = obj[attr]
            name = meta.get("class-name") if isinstance(meta, dict) else None
            if isinstance(value, list):
                cand.defects.append(Defect(where, "multi_label", "multi-label manifests are not supported"))
                continue
            if not isinstance(name, str) or not name:
                cand.defects.append(Defect(where, "missing_label", f"'{attr}-metadata' has no class-name"))
                continue
            if isinstance(value, int):
                if index_to_name.setdefault(value, name) != name:
                    cand.defects.append(Defect(where, "inconsistent_label",
                                               f"index {value} is {name!r} here but {index_to_name[value]!r} earlier"))
                    continue
            try:
                path = resolve_ref(ref, manifest.parent, s3_root)
            except ValueError as exc:
                cand.defects.append(Defect(where, "bad_source_ref", str(exc)))
                continue
            image_id = path.stem
            if not _new_existing_file(cand, seen, where, image_id, path, ref, (unfetched or {}).get(ref)):
                continue
            row = {"image_id": image_id, "path": str(path.resolve()), "label": name,
                   "group_id": str(obj.get("lesion_id") or obj.get("group_id") or image_id)}
            for k, v in obj.items():
                if k not in ("source-ref", attr, f"{attr}-metadata", "lesion_id", "group_id") and isinstance(v, (str, int, float)):
                    row[k] = v
            cand.rows.append(row)
    if len(index_to_name) == len(set(index_to_name.values())) and index_to_name:
        ordered = [index_to_name[i] for i in sorted(index_to_name)]
        if sorted(index_to_name) == list(range(len(ordered))):
            cand.classes = ordered
    return cand


def _new_existing_file(cand: Candidates, seen: set[str], where: str, image_id: str, path: Path, ref: str,
                       unfetched: StorageError | None = None) -> bool:
    """A manifest row's id not listed before and its file there; otherwise the defect is recorded (``unfetched``:
    why the object could not be copied from S3)."""
    if image_id in seen:
        cand.defects.append(Defect(where, "duplicate_id", f"image_id {image_id} already listed"))
        return False
    seen.add(image_id)
    if not path.is_file():
        code = "missing_file" if unfetched is None or unfetched.kind == "missing" else "unreadable_file"
        cand.defects.append(Defect(where, code, str(unfetched) if unfetched else f"{ref} not found"))
        return False
    return True


def read_csv_manifest(path: Path) -> Candidates:
    cand = Candidates(rows=[], fmt="csv")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"path", "label"} <= set(table.columns):
        raise IngestError(f"{path}: a CSV manifest needs columns 'path' and 'label' (found {list(table.columns)})")
    seen: set[str] = set()
    for line_no, rec in enumerate(table.to_dict("records"), start=2):
        where = f"{path.name} line {line_no}"
        try:
            p = resolve_ref(rec["path"], path.parent, None)
        except ValueError as exc:
            cand.defects.append(Defect(where, "bad_path", str(exc)))
            continue
        image_id = rec.get("image_id") or p.stem
        if not _new_existing_file(cand, seen, where, image_id, p, rec["path"]):
            continue
        row = {"image_id": image_id, "path": str(p.resolve()), "label": rec["label"].strip(),
               "group_id": (rec.get("group") or "").strip() or image_id}
        row.update({k: v for k, v in rec.items() if k not in ("path", "label", "group", "image_id")})
        cand.rows.append(row)
    return cand


def detect_format(source: Path) -> str:
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".zip":
            return "dataverse"
        if suffix in (".manifest", ".jsonl", ".json"):
            return "groundtruth"
        if suffix == ".csv":
            return "csv"
        raise IngestError(f"{source}: cannot tell the format from the name; pass --format")
    if source.is_dir():
        if _find_metadata(source) is not None:
            return "ham10000"
        if sorted(source.glob("*.zip")):
            zips = sorted(source.glob("*.zip"))
            raise IngestError(f"{source}: holds {zips[0].name}; pass the zip itself as SOURCE")
        return "folders"
    raise IngestError(f"{source}: no such file or folder")


# --------------------------------------------------------------------------- validation


def _check_file(args: tuple[str, int, int]) -> tuple[str | None, int, int, str | None, str | None]:
    """Worker: check what the file is (never opening a FIFO or an oversized file), read once, hash,
    fully decode. Returns (sha256, width, height, error_code, reason)."""
    path, max_pixels, max_bytes = args
    problem = file_problem(path, max_bytes)
    if problem is not None:
        return None, 0, 0, problem.code, problem.reason
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        return None, 0, 0, "unreadable_file", exc.strerror or exc.__class__.__name__
    if len(data) > max_bytes:  # grew after the check
        return None, 0, 0, "file_too_large", f"over the {max_bytes}-byte file limit"
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = imageio.verify_image(data, max_pixels=max_pixels)
    except imageio.ImageError as exc:
        return digest, 0, 0, exc.code, exc.reason
    return digest, info.width, info.height, None, None


def check_files(paths: list[str], max_pixels: int, workers: int, progress: bool,
                max_bytes: int = MAX_FILE_MB << 20) -> list[tuple]:
    from tqdm.auto import tqdm

    jobs = [(p, max_pixels, max_bytes) for p in paths]
    if workers <= 1 or len(jobs) < 8:
        return [_check_file(j) for j in tqdm(jobs, desc="check", unit="img", disable=not progress)]
    with ProcessPoolExecutor(workers) as pool:
        chunk = max(1, min(64, len(jobs) // (workers * 4)))
        return list(tqdm(pool.map(_check_file, jobs, chunksize=chunk), total=len(jobs), desc="check",
                         unit="img", disable=not progress))


def records_hash(table: pd.DataFrame) -> str:
    """Content hash of a record table: ids, labels, groups and file hashes (paths excluded)."""
    cols = ["image_id", "label", "group_id", "sha256"]
    canon = table[cols].sort_values("image_id").to_csv(index=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def _read_source(source: Path | str, out: Path, fmt: str, s3_root: str | None, label_attribute: str | None,
                 max_bytes: int) -> Candidates:
    if fmt == "ham10000":
        return read_ham10000(source)
    if fmt == "dataverse":
        return read_dataverse(source, out)
    if fmt == "folders":
        return read_folders(source)
    if fmt == "csv":
        return read_csv_manifest(source)
    failed: dict[str, StorageError] = {}
    if s3.is_s3(source) or not s3_root:  # s3:// objects are read from S3 itself, into OUT/s3
        source, failed = fetch_groundtruth(source, out, max_bytes)
        s3_root = str(out / S3_MIRROR)
    return read_groundtruth(source, Path(s3_root), label_attribute, failed)


def fetch_groundtruth(source: str | Path, out: Path, max_bytes: int) -> tuple[Path, dict[str, StorageError]]:
    """Copy an ``s3://`` Ground Truth manifest and every object it names (``s3://`` references, and keys
    relative to an ``s3://`` manifest) into ``OUT/s3/<bucket>/<key>``, confined there as ``--s3-root`` is.
    Returns the local manifest and ``{reference: StorageError}`` for the objects that cannot be had (no such key,
    access denied). An unreachable endpoint stops ingest; what was fetched is kept, a rerun fetches the rest."""
    mirror, base = out / S3_MIRROR, None
    if s3.is_s3(source):
        try:
            manifest = s3_path(source, mirror)
        except ValueError as exc:
            raise IngestError(str(exc)) from None
        s3.download(source, manifest, max_bytes)
        base = source.rsplit("/", 1)[0]
    else:
        manifest = Path(source)
    refs: dict[str, tuple[str, Path]] = {}
    with open(manifest, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                ref = json.loads(line).get("source-ref")
            except (ValueError, AttributeError):
                continue
            plain = isinstance(ref, str) and "://" not in ref and ".." not in PurePosixPath(ref).parts
            url = ref if s3.is_s3(ref) else s3.join(base, ref) if base and plain and not ref.startswith("/") else None
            try:
                if url:
                    refs[ref] = (url, s3_path(url, mirror))
            except ValueError:
                continue  # read_groundtruth refuses it, naming the reason
    if refs:
        s3.filesystem()  # s3fs missing: one error now, not one per object
    try:
        failed = s3.fetch_all(list(dict(refs.values()).items()), max_bytes)
    except StorageError as exc:
        raise IngestError(f"{exc}; what was fetched is kept in {mirror}: run the same command again to "
                          "fetch the rest") from None
    return manifest, {ref: failed[url] for ref, (url, _) in refs.items() if url in failed}


def ingest(source: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto", classes: list[str] | None = None,
           s3_root: str | None = None, label_attribute: str | None = None,
           max_pixels: int = imageio.DEFAULT_MAX_PIXELS, workers: int | None = None, strict: bool = False,
           max_file_mb: int = MAX_FILE_MB, progress: bool = False, metadata_columns: str | dict | None = None) -> dict:
    """Read ``source``, validate every image, write the record table; return the report dict.
    ``metadata_columns``: where age/sex/site are read from when not under their usual names."""
    url = source if s3.is_s3(source) else None
    source, out = url or Path(source), Path(out)
    if fmt not in FORMATS:
        raise IngestError(f"format must be one of {FORMATS}, got {fmt!r}")
    if url and fmt not in ("auto", "groundtruth"):
        raise IngestError(f"{url}: an s3:// source is read as a Ground Truth manifest; copy other layouts locally")
    mapping = parse_mapping(metadata_columns)
    for c in classes or []:
        if class_name_problem(c):
            raise IngestError(f"--classes: {class_name_problem(c)}")
    fmt = "groundtruth" if url else detect_format(source) if fmt == "auto" else fmt
    out.mkdir(parents=True, exist_ok=True)
    cand = _read_source(source, out, fmt, s3_root, label_attribute, max_file_mb << 20)

    defects = list(cand.defects)
    # The dataset root: nothing outside it is read (a symlink or a manifest row pointing elsewhere is refused).
    root = out / S3_MIRROR if url else {"ham10000": source, "folders": source, "csv": source.parent,
                                        "dataverse": out / "extracted"}.get(fmt)
    rows = []
    for row in cand.rows:
        if root is not None and not inside(row["path"], root):
            defects.append(Defect(row["image_id"], "outside_root",
                                  f"{row['path']} resolves outside the dataset root {root}; refused"))
        elif class_name_problem(row["label"]):
            defects.append(Defect(row["image_id"], "unsafe_class_name", class_name_problem(row["label"])))
        else:
            rows.append(row)
    cand.rows = rows
    given = keep_metadata(rows, mapping)
    class_list = [c for c in (list(classes) if classes else cand.classes or sorted({r["label"] for r in rows}))]
    index = {c: i for i, c in enumerate(class_list)}
    labelled = []
    for row in cand.rows:
        if row["label"] not in index:
            defects.append(Defect(row["image_id"], "unknown_label",
                                  f"label {row['label']!r} is not one of {', '.join(class_list)}"))
        else:
            labelled.append(row)

    workers = workers or os.cpu_count() or 1
    results = check_files([r["path"] for r in labelled], max_pixels, workers, progress, max_file_mb << 20)
    kept = []
    for row, (digest, w, h, code, reason) in zip(labelled, results):
        if code is not None:
            defects.append(Defect(row["image_id"], code, f"{Path(row['path']).name}: {reason}"))
            continue
        row.update(sha256=digest, width=w, height=h, class_index=index[row["label"]])
        kept.append(row)

    table = pd.DataFrame(kept)
    if not table.empty:
        extra = [c for c in table.columns if c not in BASE_COLUMNS]
        table = table[BASE_COLUMNS + extra].sort_values("image_id").reset_index(drop=True)
    counts = {c: int((table["label"] == c).sum()) if not table.empty else 0 for c in class_list}
    report = {
        "source": str(source), "format": fmt, "records": int(len(table)), "dropped": len(defects),
        "classes": class_list, "class_counts": counts,
        "groups": int(table["group_id"].nunique()) if not table.empty else 0,
        "records_sha256": records_hash(table) if not table.empty else None,
        "defects": [d.as_dict() for d in defects],
    }
    if cand.label_attribute:
        report["label_attribute"] = cand.label_attribute
    if given:
        report["metadata"] = {f: int((table[f] != "").sum()) if f in table else 0 for f in METADATA_FIELDS}
    atomic_write_json(out / REPORT_FILE, report)
    if table.empty:
        raise IngestError(f"no usable images in {source} ({len(defects)} defects; see {out / REPORT_FILE})")
    atomic_write_text(out / RECORDS_FILE, frame_csv(table))  # every id and path exactly, whatever it holds
    atomic_write_json(out / CLASSES_FILE, class_list, indent=None)
    if strict and defects:
        raise IngestError(f"--strict: {len(defects)} defects found (see {out / REPORT_FILE})")
    return report


def _looks_raw(folder: Path) -> bool:
    """A folder ``medpipe ingest`` could read (metadata CSV, zip, manifest or images near the top)."""
    for entry in list(folder.iterdir())[:1000]:
        if entry.suffix.lower() in (*IMAGE_SUFFIXES, ".csv", ".zip", ".manifest") or entry.name.startswith("HAM10000"):
            return True
        if entry.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in list(entry.iterdir())[:50]):
            return True
    return False


def check_data_folder(data_dir: str | os.PathLike) -> Path:
    """``data_dir`` as a Path; a missing folder is refused naming the command that writes one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IngestError(f"{data_dir}: no such folder; --data takes the folder written by "
                          f"'medpipe ingest SOURCE --out {data_dir}'")
    return data_dir


def load_records(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """Load ``records.csv`` and ``classes.json`` from an ingested data directory."""
    data_dir = check_data_folder(data_dir)
    rec_path, cls_path = data_dir / RECORDS_FILE, data_dir / CLASSES_FILE
    if not rec_path.is_file() or not cls_path.is_file():
        if _looks_raw(data_dir):
            raise IngestError(f"{data_dir}: a raw dataset, not an ingested data folder; ingest it into a new folder "
                              f"first ('medpipe ingest {data_dir} --out DATA') and pass --data DATA")
        raise IngestError(f"{data_dir}: not an ingested data folder (no {RECORDS_FILE}/{CLASSES_FILE}); "
                          f"run 'medpipe ingest SOURCE --out DATA' into a new folder and pass --data DATA")
    table = read_csv_table(rec_path, dtype={"image_id": str, "path": str, "label": str, "group_id": str,
                                            "sha256": str})
    classes = json.loads(cls_path.read_text())
    return table, classes


def format_report(report: dict) -> str:
    lines = [f"ingested {report['records']} images ({report['groups']} groups) from {report['source']} "
             f"[{report['format']}]"]
    if report.get("label_attribute"):
        lines.append(f"  labels from the attribute {report['label_attribute']!r}")
    lines.append("  classes: " + ", ".join(f"{c}={n}" for c, n in report["class_counts"].items()))
    if report["defects"]:
        by_reason: dict[str, int] = {}
        for d in report["defects"]:
            by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        lines.append(f"  dropped {report['dropped']}: " + ", ".join(f"{r}={n}" for r, n in sorted(by_reason.items())))
        for d in report["defects"][:20]:
            lines.append(f"    - {d['item']}: {d['reason']} ({d['detail']})")
        if len(report["defects"]) > 20:
            lines.append(f"    ... {len(report['defects']) - 20} more in {REPORT_FILE}")
    else:
        lines.append("  no defects")
    return "\n".join(lines)
