"""Streaming shards: written once, read as streams split over ranks and workers."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from medpipe.cli import main
from tests.conftest import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard_dir(data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("sh") / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("cache"))
    out = data.parent / "shards"
    assert main(["shard", "--data", str(data), "--out", str(out), "--image-size", "32", "--shard-size", "4"]) == 0
    return out


def _ids(stream):
    return [m["image_id"] for m, _ in stream]


def test_index_and_every_record_once_across_ranks_and_workers(shard_dir):
    import pandas as pd

    from medpipe.data.shards import ShardStream, load_split, read_index

    index = read_index(shard_dir)
    splits = pd.read_csv(shard_dir.parent / "data" / "splits.csv", dtype=str)
    train_ids = set(splits.loc[splits["split"] == "train", "image_id"])
    assert index["counts"]["train"] == len(train_ids)
    assert sum(s["split"] == "train" for s in index["shards"]) > 4
    # one process: every training record exactly once per epoch, in a seeded shuffled order
    e0 = _ids(ShardStream(index, epoch=0, seed=1))
    assert sorted(e0) == sorted(train_ids) and len(e0) == len(set(e0))
    assert e0 == _ids(ShardStream(index, epoch=0, seed=1)) and e0 != _ids(ShardStream(index, epoch=1, seed=1))
    # two ranks, each with two DataLoader worker processes: a partition of the records
    seen = []
    for rank in (0, 1):
        ds = ShardStream(index, epoch=3, seed=1, rank=rank, world=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
        seen += [m["image_id"] for m, _ in loader]
    assert sorted(seen) == sorted(train_ids)
    metas, px = load_split(index, "val")
    assert px.shape[1:] == (32, 32, 3) and {m["split"] for m in metas} == {"val"}
    assert set(m["image_id"] for m in metas) == set(splits.loc[splits["split"] == "val", "image_id"])


def test_unbalanced_stream_mixes_the_per_class_shards(shard_dir):
    """imbalance none (the default) streams the natural frequencies: the per-class shards are interleaved, not read
    one class after another, and ranks get shard sets of nearly equal size, the same smallest total every epoch."""
    from medpipe.data.shards import ShardStream, deal_shards, min_rank_total, read_index

    index = read_index(shard_dir)
    train = [s for s in index["shards"] if s["split"] == "train"]
    # without the shuffle buffer, so the order is the interleaving's own
    labels = [m["class_index"] for m, _ in ShardStream(index, epoch=0, seed=0, buffer=1)]
    counts = Counter(labels)
    first = Counter(labels[: len(labels) // 4])
    assert len(first) >= min(4, len(counts))  # a quarter of the epoch already holds most classes
    runs = sum(a != b for a, b in zip(labels, labels[1:]))
    assert runs > len(labels) / 4  # class changes often (read shard by shard it changes about once per shard)
    for world in (2, 3):
        for epoch in range(3):
            parts = deal_shards(train, world, seed=1, epoch=epoch)
            assert sorted(s["name"] for p in parts for s in p) == sorted(s["name"] for s in train)
            totals = [sum(s["n"] for s in p) for p in parts]
            assert min(totals) == min_rank_total(train, world)
            assert max(totals) - min(totals) <= max(s["n"] for s in train)
        assert min_rank_total(train, world) >= sum(sorted(s["n"] for s in train)[: len(train) // world])


def test_balanced_stream_keeps_classes_balanced(shard_dir):
    from medpipe.data.shards import ShardStream, read_index

    index = read_index(shard_dir)
    counts = np.sum([s["class_counts"] for s in index["shards"] if s["split"] == "train"], axis=0)
    assert counts.max() >= 3 * counts.min()  # the data itself is imbalanced
    drawn = Counter(m["class_index"] for m, _ in ShardStream(index, epoch=0, seed=0, balanced=True, n_samples=1400))
    present = [c for c in range(len(counts)) if counts[c] > 0]
    expected = 1400 / len(present)
    assert set(drawn) == set(present)
    assert all(0.7 * expected < drawn[c] < 1.3 * expected for c in present), drawn


def test_train_streams_from_shards_by_url(shard_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", shard_dir.as_uri(), "--out", str(run), *TINY]) == 0  # file:// via fsspec
    assert (run / "model" / "model.json").is_file() and (run / "report" / "report.md").is_file()
    assert json.loads((run / "shards_index.json").read_text())["image_size"] == 32
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(np.isfinite(x["train_loss"]) for x in m)
    assert main(["train", "--data", str(shard_dir), "--out", str(tmp_path / "bad"), *TINY[:0],
                 "--image-size", "48", "--epochs", "1"]) == 2  # shards at 32 px: refused with a clear message


def test_shard_metadata_carries_the_records_group(shard_dir):
    """Each sample's group is the record table's group_id (the lesion), not the image id."""
    import pandas as pd

    from medpipe.data.shards import load_split, read_index

    records = pd.read_csv(shard_dir.parent / "data" / "records.csv", dtype=str).set_index("image_id")
    metas = load_split(read_index(shard_dir), "test")[0] + load_split(read_index(shard_dir), "val")[0]
    assert metas and all(m["group_id"] == records.loc[m["image_id"], "group_id"] for m in metas)
    assert any(m["group_id"] != m["image_id"] for m in metas)  # lesions with several images exist


def test_shards_refuse_other_split_settings(shard_dir, tmp_path, capsys):
    """A shard set is split once; a run asking for another split seed or fractions is refused by name."""
    index = json.loads((shard_dir / "index.json").read_text())
    assert (index["split_seed"], index["val_fraction"], index["test_fraction"]) == (0, 0.15, 0.15)
    run = tmp_path / "run"
    assert main(["train", "--data", str(shard_dir), "--out", str(run), *TINY, "--split-seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "split_seed 3" in err and "--split-seed" in err and not run.exists()
    assert main(["train", "--data", str(shard_dir), "--out", str(run), *TINY, "--val-fraction", "0.2"]) == 2
    assert "val_fraction 0.2" in capsys.readouterr().err


def test_every_rank_and_every_epoch_has_the_same_step_count():
    """Unbalanced streaming under several ranks: the shards dealt to a rank change every epoch, but the step count
    must not (DDP needs every rank in step; the schedule, the budget and resumes count steps per epoch). 4 shards of
    256 and one of 100 on 2 ranks gave 11 steps in some epochs and 16 in others; the loop then failed."""
    from medpipe.config import make_config
    from medpipe.errors import ConfigError
    from medpipe.train.data import ShardSource

    index = {"shards": [{"split": "train", "n": n} for n in (256, 256, 256, 256, 100)]}
    cfg = make_config({"imbalance": "none", "batch_size": 32, "seed": 3})
    counts = set()
    for rank in (0, 1):
        src = ShardSource.__new__(ShardSource)
        src.cfg, src.rank, src.world, src.index = cfg, rank, 2, index
        counts |= {len(src._plan(epoch)[0]) for epoch in range(12)}
    # one count for every rank and epoch: the smallest rank total of the size-balanced deal (256+256 against
    # 256+256+100), not of the worst deal (the 2 smallest shards, 356: 11 steps, as before the deal was balanced)
    assert counts == {(256 + 256) // 32}
    src.world = 6  # more ranks than shards: a clear refusal, not an epoch of 0 steps
    with pytest.raises(ConfigError, match="5 training shards for 6 ranks"):
        src._plan(0)
