"""Training input-pipeline throughput: medpipe's loop vs pure compute vs the original sample's pipeline.

    python benchmarks/train_throughput.py [--count 600 --size 64 --steps 12]

All in one run, same model (MONAI DenseNet121), optimiser (AdamW) and batch size:
 (a) medpipe: pixel cache -> seeded MONAI train preset per batch (deterministic head and tail on the
     whole batch, random transforms per image) through medpipe's loader (--workers; default inline on
     CPU, worker processes on CUDA): the training source the engine uses (medpipe.train.data.CachedSource,
     train split) -> medpipe.train.engine.train_step on a model/optimiser/loss from Engine.create;
 (b) pure compute: the same train_step on a batch already in memory (no input pipeline at all);
 (c) naive, as in the 2020 sample on current MONAI: every item goes through LoadImage (PIL reader,
     full 600x450 JPEG), EnsureChannelFirst, ScaleIntensity, RandRotate, RandFlip, RandZoom at full
     size, Resize, ToTensor, with MONAI's default metadata tracking, in a DataLoader without workers;
 (c-lean) the same per-item transforms, but the JPEG decoded with Pillow directly and metadata
     tracking off (medpipe's setting): a stricter baseline, reported alongside.
All use medpipe's optimiser (fused AdamW). Targets on 2 CPU cores at 64x64: a/b >= 0.90, a/c >= 2.
On CPU, (a) and (b) run again with ``precision=bf16`` (autocast bf16 + channels_last, oneDNN's
AVX512-BF16/AMX kernels): target a-bf16/a >= 1.4 (issue 16). On CUDA, (a) and (b) are bf16 already.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synth_dataset, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per method (after 2 warm-up steps)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=-1, help="medpipe loader: -1 auto, 0 inline, 1 thread, >1 processes")
    args = ap.parse_args()

    import tempfile

    from monai.data import set_track_meta
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, RandFlip, RandRotate, RandZoom, Resize, \
        ScaleIntensity, ToTensor

    import itertools

    from medpipe.config import make_config
    from medpipe.data.sources import ingest, load_records
    from medpipe.train.data import CachedSource, epoch_order
    from medpipe.train.engine import Engine, train_step
    from medpipe.utils import resolve_device

    device = resolve_device(args.device)
    folder = synth_dataset(args.count)
    data = Path(tempfile.mkdtemp()) / "data"
    ingest(folder, data)
    table, classes = load_records(data)
    cfg = make_config({"image_size": args.size, "batch_size": args.batch, "workers": args.workers,
                       "device": device.type})
    source = CachedSource(data, cfg, pin=device.type == "cuda")  # split + pixel cache + loader, as in training
    labels = table["class_index"].to_numpy().astype(np.int64)
    n_needed = (args.steps + 2) * args.batch
    # the naive baselines read the same kind of epoch order as the pipeline (the config's imbalance setting),
    # straight from the files
    order = np.concatenate([epoch_order(labels, len(classes), cfg, e) for e in range(math.ceil(n_needed / len(labels)))])

    def fresh():
        torch.manual_seed(0)
        engine = Engine.create(cfg, source, device)
        engine.model.train()
        return engine.model, engine.optimizer, engine.scheduler, engine.loss_fn

    def timed(batches_iter, bf16=None):
        model, opt, sched, loss_fn = fresh()
        it = iter(batches_iter)
        for _ in range(2):  # warm-up
            x, y = next(it)
            train_step(model, x, y, loss_fn, opt, sched, 1.0, device, bf16=bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, n = time.perf_counter(), 0
        for _ in range(args.steps):
            x, y = next(it)
            train_step(model, x, y, loss_fn, opt, sched, 1.0, device, bf16=bf16)
            n += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    # (a) medpipe: the source's epochs back to back (the train split is smaller than the timed steps need)
    bf16_rows = device.type == "cpu"
    try:
        a = timed(itertools.chain.from_iterable(source.epoch(e) for e in itertools.count()), bf16=False if bf16_rows
                  else None)
        a16 = timed(itertools.chain.from_iterable(source.epoch(e) for e in itertools.count(1000)), bf16=True) \
            if bf16_rows else None
        xb, yb = next(iter(source.epoch(0)))
    finally:
        source.close()

    # (b) pure compute: one in-memory batch, reused

    def same_batch():
        while True:
            yield xb, yb
    b = timed(same_batch())
    b16 = timed(same_batch(), bf16=True) if bf16_rows else None

    # (c) naive per-item pipeline from the original sample, on current MONAI
    from PIL import Image

    paths = list(table["path"])
    augment = [ScaleIntensity(), RandRotate(range_x=math.radians(15), prob=0.5, keep_size=True),
               RandFlip(spatial_axis=0, prob=0.5), RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5, keep_size=True),
               Resize((args.size, args.size))]
    sample_tf = Compose([LoadImage(image_only=True, reader="PILReader"), EnsureChannelFirst(channel_dim=-1), *augment,
                         ToTensor()])
    lean_tf = Compose(augment)

    class Naive(torch.utils.data.Dataset):
        def __init__(self, lean: bool):
            self.lean = lean

        def __len__(self):
            return n_needed

        def __getitem__(self, i):
            j = int(order[i])
            if self.lean:
                img = np.asarray(Image.open(paths[j]).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
                return torch.as_tensor(lean_tf(img)), int(labels[j])
            return torch.as_tensor(sample_tf(paths[j])), int(labels[j])

    set_track_meta(True)  # MONAI's default, which the sample ran with
    try:
        c = timed(torch.utils.data.DataLoader(Naive(lean=False), batch_size=args.batch, num_workers=0))
    finally:
        set_track_meta(False)  # medpipe's setting
    c_lean = timed(torch.utils.data.DataLoader(Naive(lean=True), batch_size=args.batch, num_workers=0))

    print(f"{'method':<44}{'images/s':>10}")
    for name, v in (("(a) medpipe (cache + MONAI train preset)", a), ("(b) pure compute (tensors in memory)", b),
                    ("(c) naive (the 2020 sample, per item)", c),
                    ("(c-lean) naive, Pillow decode, no metadata", c_lean)):
        print(f"{name:<44}{v:>10.1f}")
    if bf16_rows:
        print(f"{'(a-bf16) medpipe, precision bf16':<44}{a16:>10.1f}")
        print(f"{'(b-bf16) pure compute, bf16':<44}{b16:>10.1f}")
        print(f"a-bf16/a = {a16 / a:.2f} (target >= 1.4)   b-bf16/b = {b16 / b:.2f}")
    print(f"a/b = {a / b:.2f} (target >= 0.90)   a/c = {a / c:.2f} (target >= 2)   c/b = {c / b:.2f}   "
          f"a/c-lean = {a / c_lean:.2f}   "
          f"[{device.type}, {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads]")
    path = write_result(f"train_throughput_{args.size}_{device.type}", {
        "size": args.size, "batch": args.batch, "steps": args.steps, "device": device.type,
        "medpipe_images_per_s": a, "compute_images_per_s": b, "naive_images_per_s": c,
        "naive_lean_images_per_s": c_lean, "a_over_b": a / b, "a_over_c": a / c, "a_over_c_lean": a / c_lean,
        "workers": args.workers, "medpipe_bf16_images_per_s": a16, "compute_bf16_images_per_s": b16,
        "a_bf16_over_a": a16 / a if a16 else None, "targets": {"a_over_b": 0.9, "a_over_c": 2.0, "a_bf16_over_a": 1.4}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
