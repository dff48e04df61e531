"""Synthetic dermatoscopy data in the exact HAM10000 layout.

``medpipe synth OUT`` writes ``HAM10000_metadata.csv`` and ``HAM10000_images_part_{1,2}/`` of
RGB JPEGs named ``ISIC_00xxxxx.jpg`` (600x450 by default), with the class mix of the real set,
several images for some lesions, and class-dependent colour, shape, border and texture. Each class
is drawn from overlapping parameter ranges and some lesions are blended towards a naevus, so a small
model learns the classes well but not perfectly. The patient metadata (age, sex, localization) is
drawn per lesion from class-dependent distributions shaped like HAM10000's (naevi young and on the
trunk, basal-cell carcinomas and actinic keratoses old and on the head and neck), overlapping so it
helps a model without deciding the class. Everything is a function of ``seed``.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medpipe.utils import atomic_write_text, csv_text

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
HAM_TOTAL = 10015
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
LOCALIZATIONS = (
    "back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
    "unknown", "neck", "scalp", "hand", "ear", "genital", "acral",
)
# Per class: age mean and spread (years), share of men, and the localization weights (LOCALIZATIONS order).
_PATIENT = {
    "nv": (42, 16, 0.50, (20, 12, 20, 9, 8, 1, 4, 2, 1, 1, 0.5, 1, 0.2, 0.5, 1)),
    "mel": (60, 15, 0.58, (18, 14, 12, 10, 4, 6, 5, 2, 1, 2, 2, 1, 1, 0.5, 1)),
    "bkl": (62, 13, 0.52, (10, 6, 10, 10, 3, 22, 6, 1, 1, 3, 3, 1, 1, 0.3, 0.3)),
    "bcc": (67, 12, 0.60, (10, 4, 6, 6, 2, 26, 6, 0.5, 1, 8, 6, 1, 5, 0.2, 0.2)),
    "akiec": (69, 11, 0.65, (2, 4, 2, 16, 1, 30, 3, 1, 1, 4, 8, 12, 6, 0.2, 0.2)),
    "vasc": (50, 20, 0.48, (8, 16, 14, 8, 12, 6, 4, 2, 1, 2, 1, 2, 0.5, 3, 1)),
    "df": (45, 14, 0.40, (2, 40, 3, 18, 2, 1, 1, 2, 1, 0.5, 0.2, 2, 0.2, 0.2, 1)),
}
FORMATS = ("folders", "dataverse")  # dataverse: the folders plus dataverse_files.zip
FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is the first HAM10000 image id

# Per class: lesion RGB (mean), radius fraction, border irregularity, texture kind, extra feature.
_STYLE = {
    "nv": dict(rgb=(120, 80, 55), radius=0.22, irregular=0.05, texture="network"),
    "mel": dict(rgb=(70, 45, 40), radius=0.30, irregular=0.22, texture="multicolour"),
    "bkl": dict(rgb=(150, 115, 80), radius=0.25, irregular=0.12, texture="waxy"),
    "bcc": dict(rgb=(200, 140, 140), radius=0.20, irregular=0.10, texture="vessels"),
    "akiec": dict(rgb=(190, 105, 95), radius=0.21, irregular=0.16, texture="scaly"),
    "vasc": dict(rgb=(150, 40, 70), radius=0.15, irregular=0.04, texture="lobules"),
    "df": dict(rgb=(155, 110, 85), radius=0.12, irregular=0.05, texture="central_white"),
}


@dataclass(frozen=True)
class SynthSpec:
    count: int = 500
    width: int = 600
    height: int = 450
    seed: int = 0
    quality: int = 90


def class_counts(n: int) -> dict[str, int]:
    """HAM10000 proportions scaled to ``n`` with every class present (>= 3 where n allows)."""
    if n < len(HAM_CLASSES):
        raise ValueError(f"count must be at least {len(HAM_CLASSES)} so every class is present, got {n}")
    floor = min(3, n // len(HAM_CLASSES))
    counts = {c: max(floor, round(HAM_COUNTS[c] * n / HAM_TOTAL)) for c in HAM_CLASSES}
    counts["nv"] += n - sum(counts.values())
    return counts


def _lesion_sizes(n_images: int, rng: np.random.Generator) -> list[int]:
    """Split a class's images into lesions: about 1.34 images per lesion as in HAM10000.

    The first three lesions of a class hold one image each so small classes still have enough
    lesions to appear in every split.
    """
    sizes: list[int] = []
    left = n_images
    while left > 0:
        if len(sizes) < 3:
            k = 1
        else:
            k = int(rng.choice([1, 2, 3, 4], p=[0.78, 0.14, 0.06, 0.02]))
        k = min(k, left)
        sizes.append(k)
        left -= k
    return sizes


def make_metadata(spec: SynthSpec) -> list[dict]:
    """The metadata rows (one per image), plus hidden per-lesion render parameters."""
    rng = np.random.default_rng(spec.seed)
    rows: list[dict] = []
    lesion_no = 0
    for dx, n in class_counts(spec.count).items():
        for size in _lesion_sizes(n, rng):
            lesion_no += 1
            lesion_seed = int(rng.integers(0, 2**31 - 1))
            age, sex, loc = _patient(dx, rng)
            if dx == "nv":
                dx_type = str(rng.choice(["follow_up", "histo", "consensus", "confocal"], p=[0.55, 0.3, 0.13, 0.02]))
            elif dx in ("mel", "bcc", "akiec"):
                dx_type = "histo"
            else:
                dx_type = str(rng.choice(["histo", "consensus"], p=[0.6, 0.4]))
            for view in range(size):
                rows.append(dict(lesion_id=f"HAM_{lesion_no:07d}", dx=dx, dx_type=dx_type, age=age, sex=sex,
                                 localization=loc, _lesion_seed=lesion_seed, _view=view))
    order = rng.permutation(len(rows))
    for number, idx in enumerate(order):
        rows[idx]["image_id"] = f"ISIC_{FIRST_IMAGE_NUMBER + number:07d}"
    rows.sort(key=lambda r: r["lesion_id"])
    return rows


def _patient(dx: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Age (in 5-year steps, rarely missing), sex and localization of a lesion of class ``dx``. It takes the
    same draws from ``rng`` whatever the class, so the images of a seed do not depend on these choices."""
    mean, spread, men, weights = _PATIENT[dx]
    age = "" if rng.random() < 0.006 else str(int(np.clip(mean + spread * (rng.normal(52, 17) - 52) / 17, 0, 85)
                                                  // 5 * 5))
    sex = str(rng.choice(["male", "female", "unknown"], p=[men * 0.995, (1 - men) * 0.995, 0.005]))
    u = (int(rng.choice(len(LOCALIZATIONS))) + 0.5) / len(LOCALIZATIONS)  # one uniform index, mapped per class
    cdf = np.cumsum(weights) / np.sum(weights)
    loc = LOCALIZATIONS[min(int(np.searchsorted(cdf, u)), len(LOCALIZATIONS) - 1)]
    return age, sex, loc


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Cheap value noise in [0, 1]: a small random grid upsampled bilinearly."""
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = rng.random((gh, gw)).astype(np.float32)
    im = Image.fromarray((grid * 255).astype(np.uint8), mode="L").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def render_lesion(dx: str, lesion_seed: int, view: int, width: int, height: int) -> np.ndarray:
    """Render one dermatoscopy-like RGB image (uint8, HxWx3)."""
    lesion_rng = np.random.default_rng(lesion_seed)  # shared by all views of a lesion
    view_rng = np.random.default_rng([lesion_seed, view + 1])
    style = dict(_STYLE[dx])
    # Ambiguity: some lesions drift towards a naevus, so classes overlap.
    blend = float(lesion_rng.beta(1.2, 4.0)) if dx != "nv" else float(lesion_rng.beta(1.0, 8.0))
    other = _STYLE["nv"] if dx != "nv" else _STYLE[str(lesion_rng.choice(["mel", "bkl"]))]
    rgb = (1 - blend) * np.array(style["rgb"], np.float32) + blend * np.array(other["rgb"], np.float32)
    rgb += lesion_rng.normal(0, 14, 3)
    radius = ((1 - blend) * style["radius"] + blend * other["radius"]) * lesion_rng.uniform(0.75, 1.3)
    irregular = max(0.0, (1 - blend) * style["irregular"] + blend * other["irregular"] + lesion_rng.normal(0, 0.025))
    texture = style["texture"] if lesion_rng.random() > blend else other["texture"]
    n_harm = 7
    amps = lesion_rng.normal(0, irregular, n_harm) / np.sqrt(np.arange(1, n_harm + 1))
    phases = lesion_rng.uniform(0, 2 * np.pi, n_harm)
    aspect = lesion_rng.uniform(0.75, 1.0)

    h, w = height, width
    s = min(h, w)
    # Per-view variation: position, rotation, lighting.
    cy = h / 2 + view_rng.normal(0, 0.06) * s
    cx = w / 2 + view_rng.normal(0, 0.06) * s
    theta = view_rng.uniform(0, 2 * np.pi)
    light = view_rng.uniform(0.85, 1.12)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx_ = (yy - cy) / s, (xx - cx) / s
    ry = dy * np.cos(theta) - dx_ * np.sin(theta)
    rx = dy * np.sin(theta) + dx_ * np.cos(theta)
    ang = np.arctan2(ry, rx)
    dist = np.sqrt((ry / aspect) ** 2 + rx**2)
    edge = np.ones_like(ang)
    for k in range(n_harm):
        edge += amps[k] * np.cos((k + 2) * ang + phases[k])
    r = dist / (radius * np.clip(edge, 0.4, 1.8))
    softness = 0.06 + 0.1 * view_rng.random()
    mask = np.clip((1.0 - r) / softness, 0.0, 1.0)

    skin = np.array([222, 178, 160], np.float32) + lesion_rng.normal(0, 12, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = skin
    img += (_smooth_noise(view_rng, h, w, 12)[..., None] - 0.5) * 18

    lesion = np.empty((h, w, 3), np.float32)
    lesion[:] = rgb
    tex_noise = _smooth_noise(lesion_rng, h, w, 40)
    if texture == "network":
        net = (np.sin(xx * 0.35 / (s / 450)) * np.sin(yy * 0.35 / (s / 450)))
        lesion -= (net[..., None] > 0.6) * 30
    elif texture == "multicolour":
        blue = _smooth_noise(lesion_rng, h, w, 6)
        lesion = lesion * (1 - 0.6 * (blue[..., None] > 0.6)) + np.array([90, 100, 140]) * 0.6 * (blue[..., None] > 0.6)
        lesion -= (tex_noise[..., None] > 0.65) * 40
    elif texture == "waxy":
        stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 0.25 / (s / 450))
        lesion += stripes[..., None] * 18
    elif texture == "vessels":
        ves = np.abs(np.sin(ang * 5 + dist * 40 + phases[0]))
        lesion = np.where((ves < 0.12)[..., None] & (dist < radius)[..., None], np.array([170, 30, 40], np.float32), lesion)
    elif texture == "scaly":
        lesion += (tex_noise[..., None] - 0.5) * 70
        lesion[..., 1:] += (tex_noise[..., None] > 0.7) * 40
    elif texture == "lobules":
        lob = _smooth_noise(lesion_rng, h, w, 14)
        lesion *= (0.75 + 0.5 * lob)[..., None]
    elif texture == "central_white":
        centre = np.clip(1 - dist / (0.45 * radius), 0, 1)[..., None]
        lesion = lesion * (1 - centre) + np.array([235, 225, 215], np.float32) * centre
    lesion += (tex_noise[..., None] - 0.5) * 20

    img = img * (1 - mask[..., None]) + lesion * mask[..., None]
    # Dermatoscope vignette and sensor noise.
    vign = 1 - 0.35 * np.clip(np.sqrt(((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 1.6 - 0.3, 0, 1)
    img = img * vign[..., None] * light
    img += view_rng.normal(0, 5, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_job(args: tuple) -> tuple[str, bytes]:
    image_id, dx, lesion_seed, view, width, height, quality = args
    return image_id, encode_jpeg(render_lesion(dx, lesion_seed, view, width, height), quality)


def part_of(index: int, total: int) -> int:
    """HAM10000 puts the first ~half of the ids (5,000 of 10,015) in part 1."""
    return 1 if index < math.ceil(total * 5000 / HAM_TOTAL) else 2


def write_synthetic(out: str | os.PathLike, spec: SynthSpec, *, fmt: str = "folders", workers: int | None = None,
                    progress: bool = False) -> dict:
    """Write the dataset; returns a summary. ``fmt`` is ``folders`` or ``dataverse`` (folders + zip)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_metadata(spec)
    by_id = sorted(rows, key=lambda r: r["image_id"])
    part = {r["image_id"]: part_of(i, len(by_id)) for i, r in enumerate(by_id)}
    for p in (1, 2):
        (out / f"HAM10000_images_part_{p}").mkdir(exist_ok=True)
    jobs = [(r["image_id"], r["dx"], r["_lesion_seed"], r["_view"], spec.width, spec.height, spec.quality) for r in rows]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    from tqdm.auto import tqdm

    def _write(image_id: str, data: bytes) -> None:
        (out / f"HAM10000_images_part_{part[image_id]}" / f"{image_id}.jpg").write_bytes(data)

    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for image_id, data in pool.map(_render_job, jobs, chunksize=8):
                _write(image_id, data)
                bar.update()
    else:
        for job in jobs:
            _write(*_render_job(job))
            bar.update()
    bar.close()
    meta_path = out / "HAM10000_metadata.csv"
    atomic_write_text(meta_path, csv_text(METADATA_COLUMNS, ([r.get(c, "") for c in METADATA_COLUMNS] for r in rows),
                                          neutralise=False))
    summary = {"out": str(out), "images": len(rows), "lesions": len({r["lesion_id"] for r in rows}),
               "classes": class_counts(spec.count), "width": spec.width, "height": spec.height, "seed": spec.seed}
    if fmt == "dataverse":
        summary["dataverse_zip"] = str(write_dataverse_zip(out, out / "dataverse_files.zip"))
    return summary


def write_dataverse_zip(folder: Path, dest: Path) -> Path:
    """The Harvard Dataverse form: a zip holding the two image zips and ``HAM10000_metadata``."""
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as outer:
        for p in (1, 2):
            inner_buf = io.BytesIO()
            with zipfile.ZipFile(inner_buf, "w", compression=zipfile.ZIP_STORED) as inner:
                part_dir = folder / f"HAM10000_images_part_{p}"
                for f in sorted(part_dir.glob("*.jpg")):
                    inner.write(f, arcname=f.name)
            outer.writestr(f"HAM10000_images_part_{p}.zip", inner_buf.getvalue())
        outer.write(folder / "HAM10000_metadata.csv", arcname="HAM10000_metadata")
    os.replace(tmp, dest)
    return dest
