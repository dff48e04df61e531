import numpy as np
import pandas as pd
from hypothesis import given, settings, strategies as st

from medpipe.data.splits import ensure_splits, make_splits


def _table(n_groups, sizes, labels):
    rows = []
    for g in range(n_groups):
        for k in range(sizes[g]):
            rows.append({"image_id": f"img{g}_{k}", "group_id": f"G{g}", "class_index": labels[g],
                         "label": f"c{labels[g]}"})
    return pd.DataFrame(rows)


@st.composite
def tables(draw):
    n = draw(st.integers(1, 80))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    return _table(n, sizes, labels)


@settings(max_examples=120, deadline=None)
@given(tables(), st.integers(0, 2**16))
def test_no_group_in_two_splits_and_deterministic(table, seed):
    a = make_splits(table, seed=seed)
    b = make_splits(table.sample(frac=1, random_state=seed % 7), seed=seed)  # row order must not matter
    pd.testing.assert_frame_equal(a, b)
    assert a.groupby("group_id")["split"].nunique().max() == 1
    assert len(a) == len(table) and a["split"].notna().all()
    # every class with >= 3 groups appears in val and test
    for cls, grp in table.groupby("class_index"):
        if grp["group_id"].nunique() >= 3:
            present = set(a[a["label"] == f"c{cls}"]["split"])
            assert {"train", "val", "test"} <= present


def test_mixed_label_group_not_split():
    t = pd.DataFrame({"image_id": ["a", "b", "c"], "group_id": ["G", "G", "H"], "class_index": [0, 1, 1],
                      "label": ["x", "y", "y"]})
    s = make_splits(t, seed=1)
    assert s[s.group_id == "G"]["split"].nunique() == 1


def test_fractions_roughly_70_15_15():
    rng = np.random.default_rng(0)
    t = _table(2000, [1] * 2000, list(rng.integers(0, 3, 2000)))
    s = make_splits(t, seed=0)
    frac = s["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.70) < 0.02 and abs(frac["val"] - 0.15) < 0.02


def test_reused_when_matching(data_dir, tmp_path):
    s1, reused1 = ensure_splits(data_dir, tmp_path, seed=5)
    s2, reused2 = ensure_splits(data_dir, tmp_path, seed=5)
    assert not reused1 and reused2
    pd.testing.assert_frame_equal(s1.reset_index(drop=True), s2.reset_index(drop=True))
    s3, reused3 = ensure_splits(data_dir, tmp_path, seed=6)
    assert not reused3


def test_split_files_of_two_seeds_are_never_paired(data_dir, tmp_path):
    """Runs of two split seeds on one data folder at once rewrite splits.csv and splits.json in turn: a CSV of
    one seed beside the metadata of the other is not reused, and a run folder records its own split even when the
    data folder's files were rewritten by another run meanwhile."""
    import shutil

    from medpipe.config import make_config
    from medpipe.train.data import CachedSource

    s0, _ = ensure_splits(data_dir, tmp_path, seed=0)
    s1, _ = ensure_splits(data_dir, tmp_path / "other", seed=1)
    assert not s0.equals(s1)
    shutil.copyfile(tmp_path / "other" / "splits.csv", tmp_path / "splits.csv")  # seed 1's CSV, seed 0's metadata
    again, reused = ensure_splits(data_dir, tmp_path, seed=0)
    assert not reused
    pd.testing.assert_frame_equal(again.reset_index(drop=True), s0.reset_index(drop=True))

    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("splits.*"))
    src = CachedSource(data, make_config({"split_seed": 0, "image_size": 32, "workers": 0}))
    try:
        ensure_splits(data, data, seed=1)  # another run, another seed, same folder
        run = tmp_path / "run"
        run.mkdir()
        src.write_provenance(run)
    finally:
        src.close()
    recorded = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(recorded.reset_index(drop=True), s0.reset_index(drop=True))
    reused_run, ok = ensure_splits(data, run, seed=0)  # the run folder's pair is consistent
    assert ok
