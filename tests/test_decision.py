"""Decision rules (medpipe.decision): fitted on validation, stored in the package, applied by the Predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medpipe.decision import DecisionRuleError, apply_offsets, balanced_accuracy, fit_rules, resolve

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _skewed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with nv at ~67%, and probabilities from a model that is informative but leans to nv
    (as argmax over calibrated probabilities does on HAM10000)."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y = rng.choice(7, size=n, p=prior)
    logits = rng.normal(0, 1.0, (n, 7)) + np.log(prior)[None, :] * 1.0
    logits[np.arange(n), y] += 1.6
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_prior_rule_raises_balanced_accuracy_on_held_out_data():
    y_val, p_val = _skewed(1500, 0)
    y_test, p_test = _skewed(1500, 1)
    d = fit_rules(p_val, y_val, CLASSES, default="prior")
    assert d["default"] == "prior" and set(d["rules"]) == {"argmax", "prior", "class_bias", "class_bias_bagged"}
    # fitted on val: never worse than argmax there, and the gain carries over to unseen data
    for name in ("prior", "class_bias"):
        assert d["rules"][name]["val_balanced_accuracy"] >= d["rules"]["argmax"]["val_balanced_accuracy"]
    argmax_test = balanced_accuracy(y_test, p_test.argmax(1), 7)
    prior_test = balanced_accuracy(y_test, apply_offsets(p_test, d["rules"]["prior"]["offsets"]), 7)
    assert prior_test > argmax_test + 0.05
    assert 0.3 < d["rules"]["prior"]["tau"] < 2.0
    # the probabilities are not touched; only nv loses predictions
    pred = apply_offsets(p_test, d["rules"]["prior"]["offsets"])
    assert (pred == 5).sum() < (p_test.argmax(1) == 5).sum()
    json.dumps(d, allow_nan=False)  # storable in model.json


def test_balanced_probabilities_keep_argmax():
    """When argmax is already best on val, the prior rule stays at tau 0 (ties go to argmax)."""
    y = np.repeat(np.arange(7), 20)
    p = np.full((140, 7), 0.02)
    p[np.arange(140), y] = 0.88
    d = fit_rules(p, y, CLASSES)
    assert d["default"] == "argmax"
    assert d["rules"]["prior"]["tau"] == 0.0
    assert (apply_offsets(p, d["rules"]["class_bias"]["offsets"]) == y).all()


def test_bad_rules_are_clear_errors():
    y, p = _skewed(200, 2)
    d = fit_rules(p, y, CLASSES)
    with pytest.raises(DecisionRuleError, match="not in this package.*argmax.*class_bias.*prior"):
        resolve(d, "thresholds", 7)
    with pytest.raises(DecisionRuleError, match="must be one of"):
        fit_rules(p, y, CLASSES, default="nope")
    with pytest.raises(DecisionRuleError, match="do not match"):
        fit_rules(p[:, :5], y, CLASSES)
    broken = json.loads(json.dumps(d))
    broken["rules"]["prior"]["offsets"] = [0.0, 1.0]
    with pytest.raises(DecisionRuleError, match="7 finite numbers"):
        resolve(broken, "prior", 7)
    assert resolve(None, None, 7) == ("argmax", None)  # packages from before decision rules


def _package(tmp_path, decision):
    import torch

    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = create_model("resnet18", 7).eval()  # builds in a fraction of DenseNet121's time; same code path
    return save_package(tmp_path / "pkg", model, name="t", arch="resnet18", classes=CLASSES,
                        spec=PreprocessSpec(image_size=32), decision=decision)


def test_predictor_applies_the_package_rule_and_says_which(tmp_path):
    from medpipe.errors import MedpipeError
    from medpipe.infer.predictor import Predictor

    offsets = [0.0] * 7
    offsets[3] = 50.0  # a rule that always says df: visible whatever the random weights
    _package(tmp_path, {"default": "class_bias", "fitted_on": "val", "n_val": 10,
                        "rules": {"argmax": {"offsets": [0.0] * 7}, "class_bias": {"offsets": offsets}}})
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    default = Predictor(tmp_path / "pkg", device="cpu")
    plain = Predictor(tmp_path / "pkg", device="cpu", decision_rule="argmax")
    pd_, pa = default.to_predictions(default.probabilities(images)), plain.to_predictions(plain.probabilities(images))
    assert [p.label for p in pd_] == ["df"] * 3
    assert all(p.as_dict()["decision_rule"] == "class_bias" for p in pd_)
    assert [p.class_index for p in pa] == list(plain.probabilities(images).argmax(1))
    assert all(p.as_dict()["decision_rule"] == "argmax" for p in pa)
    for a, b in zip(pd_, pa):  # calibrated probabilities are the same under every rule
        assert a.probabilities == b.probabilities
    with pytest.raises(MedpipeError, match="'prior' is not in this package"):
        Predictor(tmp_path / "pkg", device="cpu", decision_rule="prior")


def test_batch_and_report_follow_the_rule(tmp_path):
    from medpipe.batch import run_batch
    from medpipe.evaluate import evaluate_arrays
    from medpipe.infer.predictor import Predictor
    from PIL import Image

    offsets = [0.0] * 7
    offsets[3] = 50.0
    _package(tmp_path, {"default": "class_bias", "fitted_on": "val", "n_val": 10,
                        "rules": {"argmax": {"offsets": [0.0] * 7, "val_balanced_accuracy": 0.2},
                                  "class_bias": {"offsets": offsets, "val_balanced_accuracy": 0.3}}})
    images = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"im{i}.png")
    run_batch(str(tmp_path / "pkg"), str(folder), str(tmp_path / "out"), backend="eager", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["df"] * 4 and {r["decision_rule"] for r in rows} == {"class_bias"}

    y = np.array([3, 3, 5, 0])
    res = evaluate_arrays(Predictor(tmp_path / "pkg", device="cpu"), images, np.arange(4), y,
                          [f"im{i}" for i in range(4)], [CLASSES[k] for k in y], tmp_path / "rep", split="test",
                          bootstrap=0)
    m = res["metrics"]
    assert m["decision_rule"] == "class_bias"
    assert m["per_class"]["df"]["sensitivity"] == 1.0  # headline label figures follow the package's rule
    assert set(m["decision_rules"]) == {"argmax", "class_bias"}
    assert m["decision_rules"]["class_bias"]["accuracy"] == 0.5
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| class_bias | " in md and "| argmax | " in md and "decision rule **class_bias**" in md


def test_onnx_export_carries_the_rule(tmp_path):
    """An ONNX consumer without medpipe gets the package's rule from the file's metadata and reproduces
    medpipe's labels."""
    import onnxruntime as ort
    import torch

    from medpipe.export import export_model
    from medpipe.infer.predictor import Predictor
    from medpipe.preprocess import eval_batch

    offsets = [0.0] * 7
    offsets[3] = 50.0
    _package(tmp_path, {"default": "class_bias", "fitted_on": "val", "n_val": 10,
                        "rules": {"argmax": {"offsets": [0.0] * 7}, "class_bias": {"offsets": offsets}}})
    export_model(str(tmp_path / "pkg"), "onnx", str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    rule = json.loads(props["decision"])
    assert rule["rule"] == "class_bias" and rule["offsets"] == offsets
    images = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    pred = Predictor(tmp_path / "pkg", device="cpu")
    logits = sess.run(None, {"image": eval_batch(images, pred.spec).numpy()})[0]
    probs = torch.softmax(torch.from_numpy(logits) / float(props["temperature"]), 1).numpy()
    labels = (np.log(probs) + np.array(rule["offsets"])).argmax(1)
    assert list(labels) == [p.class_index for p in pred.to_predictions(pred.probabilities(images))] == [3, 3, 3]


def test_cli_decision_rule_option_overrides_the_package(tmp_path, data_dir, capsys):
    """predict / evaluate / batch / serve take --decision-rule; without it the package's default applies."""
    from PIL import Image

    from medpipe.cli import build_parser, main

    offsets = [0.0] * 7
    offsets[3] = 50.0
    _package(tmp_path, {"default": "class_bias", "fitted_on": "val", "n_val": 10,
                        "rules": {"argmax": {"offsets": [0.0] * 7}, "class_bias": {"offsets": offsets}}})
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    pkg = str(tmp_path / "pkg")
    assert main(["predict", "--model", pkg, "--json", str(img)]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", pkg, "--json", "--decision-rule", "argmax", str(img)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (default["label"], default["decision_rule"]) == ("df", "class_bias")
    assert plain["decision_rule"] == "argmax" and plain["probabilities"] == default["probabilities"]
    assert plain["label"] == max(plain["probabilities"], key=plain["probabilities"].get)

    rep = tmp_path / "rep"
    assert main(["evaluate", "--model", pkg, "--data", str(data_dir), "--split", "all", "--bootstrap", "0",
                 "--backend", "eager", "--out", str(rep), "--decision-rule", "argmax"]) == 0
    m = json.loads((rep / "report.json").read_text())
    assert m["decision_rule"] == "argmax" and set(m["decision_rules"]) == {"argmax", "class_bias"}

    assert main(["batch", "--model", pkg, "--input", str(tmp_path / "x.png").rsplit("/", 1)[0], "--output",
                 str(tmp_path / "out"), "--backend", "eager", "--decision-rule", "argmax"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert {r["decision_rule"] for r in rows} == {"argmax"}

    args = build_parser().parse_args(["serve", "--model", pkg, "--decision-rule", "prior"])
    assert args.decision_rule == "prior"
    capsys.readouterr()
    assert main(["predict", "--model", pkg, "--decision-rule", "prior", str(img)]) != 0
    assert "'prior' is not in this package" in capsys.readouterr().err


def test_shrink_offsets_pulls_small_classes_toward_the_prior_rule():
    from medpipe.decision import shrink_offsets

    bias, prior = np.array([1.0, -1.0, 3.0]), np.array([0.5, 0.5, 2.0])
    counts = np.array([200.0, 6.0, 0.0])
    np.testing.assert_allclose(shrink_offsets(bias, prior, counts, 0), bias - bias.mean())
    np.testing.assert_allclose(shrink_offsets(bias, prior, counts, float("inf")), prior - prior.mean())
    got = shrink_offsets(bias, prior, counts, 20)
    w = counts / (counts + 20)
    np.testing.assert_allclose(got, w * (bias - 1.0) + (1 - w) * (prior - 1.0))
    assert abs(got[0] - (bias[0] - 1.0)) < abs(got[1] - (bias[1] - 1.0))  # the big class keeps more of its own
    assert got[2] == pytest.approx(prior[2] - 1.0)  # a class absent from validation is the prior's
    with pytest.raises(DecisionRuleError, match="k must be >= 0"):
        shrink_offsets(bias, prior, counts, -1)


def test_bagged_class_bias_is_seeded_and_averages_bootstrap_fits():
    from medpipe.decision import BAGS, _fit_class_bias, _fit_prior

    y, p = _skewed(300, 3)
    a, b = fit_rules(p, y, CLASSES), fit_rules(p, y, CLASSES)
    assert a["rules"]["class_bias_bagged"] == b["rules"]["class_bias_bagged"]  # same split, same offsets
    log_p = np.log(p)
    rng, fits = np.random.default_rng(0), []
    for _ in range(BAGS):
        idx = rng.integers(0, len(y), len(y))
        fits.append(_fit_class_bias(log_p[idx], y[idx], 7, _fit_prior(log_p[idx], y[idx], 7)[1])[0])
    np.testing.assert_allclose(a["rules"]["class_bias_bagged"]["offsets"], np.mean(fits, axis=0))
    assert not np.allclose(a["rules"]["class_bias_bagged"]["offsets"], a["rules"]["class_bias"]["offsets"])
    bag = a["rules"]["class_bias_bagged"]
    assert bag["val_balanced_accuracy"] == balanced_accuracy(y, apply_offsets(p, bag["offsets"]), 7)
