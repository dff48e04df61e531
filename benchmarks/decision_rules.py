"""Decision rules on small classes: how much the test balanced accuracy moves with the validation draw.

    python benchmarks/decision_rules.py .bench/metadata*/probs-*.npz          # every saved run
    python benchmarks/decision_rules.py FILES --draws 100 --out benchmarks/results/decision_rules.json

The rules (medpipe.decision: ``argmax``, ``prior``, ``class_bias``, ``class_bias_bagged``; and ``shrunk@k``)
are fitted on a validation split with few images of the rare classes (df 3, vasc 4 of the dev set's 297). Each
input is one trained package's calibrated probabilities on its validation and test splits (``.npz`` with
``val_probs``, ``val_labels``, ``test_probs``, ``test_labels``, ``classes``: benchmarks/metadata_quality.py
writes them). Per file and rule: the rule fitted on the whole
validation split, then refitted on ``--draws`` bootstrap resamples of it (images drawn with replacement: another
validation split of the same size), each applied to the unchanged test split. Reported per rule: the test
balanced accuracy of the full fit, and the mean and SD over draws (the SD is how much the rule's choice moves
with the validation draw), averaged over files.

Shrinkage (``shrunk``): ``class_bias``'s per-class offsets pulled toward ``prior``'s, class ``c`` keeping the
weight ``n_c / (n_c + k)`` with ``n_c`` its validation images. ``k`` is chosen on validation data only: for
every draw the rule is fitted on the resample and scored on the validation images the draw left out
(out-of-bag); the ``k`` of the grid with the best mean out-of-bag balanced accuracy over all files wins
(``k_choice``). The test figures of every ``k`` are reported beside it, never used to choose.

Bagging (``class_bias_bagged``, medpipe.decision): class_bias's offsets averaged over ``BAGS`` fits on seeded
bootstrap resamples of the validation split it is given, another way to lower the variance of a rule fitted to
few images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402

K_GRID = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, float("inf"))  # 0 = class_bias itself, inf = prior
BASE = ("argmax", "prior", "class_bias", "class_bias_bagged")


def _offsets(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    """Every rule's offsets fitted on (probs, y) by medpipe.decision.fit_rules, and the class counts."""
    from medpipe.decision import fit_rules

    fitted = fit_rules(probs, y, classes)["rules"]
    out = {name: np.asarray(fitted[name]["offsets"], dtype=np.float64) for name in BASE}
    out["counts"] = np.bincount(y, minlength=len(classes)).astype(np.float64)
    return out


def _rules(offsets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The base rules and ``shrunk@k`` for every k of the grid."""
    from medpipe.decision import shrink_offsets

    out = {name: offsets[name] for name in BASE}
    for k in K_GRID:
        out[f"shrunk@{k:g}"] = shrink_offsets(offsets["class_bias"], offsets["prior"], offsets["counts"], k)
    return out


def _bacc(probs: np.ndarray, y: np.ndarray, offsets: np.ndarray, n: int) -> float:
    from medpipe.decision import apply_offsets, balanced_accuracy

    return balanced_accuracy(y, apply_offsets(probs, offsets), n)


def study(path: Path, draws: int, seed: int) -> dict:
    """One package's figures: the full fit and ``draws`` bootstrap refits, test and out-of-bag balanced accuracy."""
    z = np.load(path)
    classes = [str(c) for c in z["classes"]]
    n = len(classes)
    vp, vy = z["val_probs"], z["val_labels"].astype(np.int64)
    tp, ty = z["test_probs"], z["test_labels"].astype(np.int64)
    full = _rules(_offsets(vp, vy, classes))
    rng = np.random.default_rng(seed)
    test, oob = {name: [] for name in full}, {name: [] for name in full}
    for _ in range(draws):
        idx = rng.integers(0, len(vy), len(vy))
        left = np.setdiff1d(np.arange(len(vy)), idx)
        rules = _rules(_offsets(vp[idx], vy[idx], classes))
        for name, b in rules.items():
            test[name].append(_bacc(tp, ty, b, n))
            oob[name].append(_bacc(vp[left], vy[left], b, n))
    return {"file": path.name, "n_val": int(len(vy)), "n_test": int(len(ty)),
            "val_counts": dict(zip(classes, np.bincount(vy, minlength=n).tolist())),
            "rules": {name: {"test_full_fit": round(_bacc(tp, ty, full[name], n), 4),
                             "test_mean": round(float(np.mean(test[name])), 4),
                             "test_sd": round(float(np.std(test[name], ddof=1)), 4),
                             "oob_mean": round(float(np.nanmean(oob[name])), 4)} for name in full}}


def summarise(files: list[dict]) -> dict:
    """Per rule, the mean over files of each figure; ``k_choice``: the k with the best mean out-of-bag score."""
    names = list(files[0]["rules"])
    summary = {name: {key: round(float(np.mean([f["rules"][name][key] for f in files])), 4)
                      for key in ("test_full_fit", "test_mean", "test_sd", "oob_mean")} for name in names}
    shrunk = [name for name in names if name.startswith("shrunk@")]
    best = max(shrunk, key=lambda name: (summary[name]["oob_mean"], -float(name.split("@")[1])))
    return {"per_rule": summary, "k_choice": {"rule": "best mean out-of-bag validation balanced accuracy",
                                              "k": best.split("@")[1], "name": best}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help=".npz files of validation and test probabilities (with "
                   "--merge: result files of this script to combine, no refitting)")
    p.add_argument("--merge", action="store_true", help="combine earlier result files (same --draws) into --out")
    p.add_argument("--draws", type=int, default=100, help="bootstrap draws of the validation split per file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "decision_rules.json")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads(f.read_text()) for f in a.files]
        result = {**parts[0], "command": " & ".join(x["command"] for x in parts),
                  "loadavg": [x["loadavg"] for x in parts], "seconds": sum(x["seconds"] for x in parts),
                  "files": [f for x in parts for f in x["files"]]}
        result["summary"] = summarise(result["files"])
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))
        return 0
    t0 = time.time()
    files = []
    for i, path in enumerate(a.files):
        files.append(study(path, a.draws, a.seed + i))
        print(path.name, json.dumps({k: v["test_sd"] for k, v in files[-1]["rules"].items()}), flush=True)
    result = {"benchmark": "decision_rules", "command": "python benchmarks/decision_rules.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "seconds": round(time.time() - t0, 1),
        "draws": a.draws, "k_grid": [str(k) for k in K_GRID], "what": __doc__.split("\n\n")[2].replace("\n", " "),
        "summary": summarise(files), "files": files}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
