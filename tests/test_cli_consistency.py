"""One command line: every subcommand's parser (tune's and fl's included) walked for options without help,
defaults printed twice and concepts spelled two ways; older spellings still work and warn once; -v
anywhere; one-line usage errors with suggestions; predict checks its inputs before loading a model and
says why a decision rule's label is not the most likely class."""

from __future__ import annotations

import argparse
import re

import pytest

from medpipe import cli, cli_options
from medpipe.cli import main

# concept -> its one visible spelling, and the spellings it must not have anywhere (they may live on as hidden
# aliases); a new option spelled like a right-hand entry fails here
SYNONYMS = {
    "--split-seed": {"--seed-split", "--splitseed"},
    "--val-fraction": {"--val", "--valid", "--validation", "--val-frac", "--val-split"},
    "--test-fraction": {"--test", "--test-frac", "--test-split"},
    "--image-size": {"--size", "--img-size", "--resolution"},
    "--shard-size": {"--per-shard", "--shard-images"},
    "--out": {"--run-dir", "--output-dir", "--out-dir", "--outdir"},
    "--lr": {"--learning-rate"},
    "--batch-size": {"--bs"},
    "--workers": {"--num-workers", "--jobs", "-j"},
    "--device": {"--gpu", "--cuda"},
    "--partition-seed": {"--site-seed"},
}
# dests that two commands may spell differently because they are different things
OWN_MEANING = {"help", "version", "format", "size"}


def _parsers():
    return list(cli.walk(cli.build_parser()))


def _visible(p: argparse.ArgumentParser):
    return [a for a in p._actions if a.help != argparse.SUPPRESS and not isinstance(
        a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))]


def _rendered_help(p: argparse.ArgumentParser, action) -> str:
    return p._get_formatter()._expand_help(action) if action.help else ""


def test_the_walk_reaches_every_subcommand():
    names = {n for n, _ in _parsers()}
    assert {"medpipe train", "medpipe split", "medpipe tune", "medpipe fl", "medpipe fl site",
            "medpipe fl simulate", "medpipe serve"} <= names
    assert len(names) > 20


def test_every_option_has_help_and_one_default():
    missing, doubled = [], []
    for name, p in _parsers():
        for a in _visible(p):
            text = _rendered_help(p, a)
            label = f"{name} {'/'.join(a.option_strings) or a.dest}"
            if not text.strip() or text.strip().startswith("("):  # nothing but a default is no help
                missing.append(label)
            if len(re.findall(r"\(default\b", text)) > 1:
                doubled.append(f"{label}: {text}")
    assert not missing, "options without help text:\n" + "\n".join(missing)
    assert not doubled, "defaults printed twice:\n" + "\n".join(doubled)


def test_each_concept_is_spelled_one_way():
    spelled: dict[str, set[str]] = {}
    wrong = []
    for name, p in _parsers():
        for a in _visible(p):
            longs = [s for s in a.option_strings if s.startswith("--")]
            for flag in a.option_strings:
                wrong += [f"{name} {flag} (say {good})" for good, bad in SYNONYMS.items() if flag in bad]
            if longs and a.dest not in OWN_MEANING:
                spelled.setdefault(a.dest, set()).add(longs[0])
            if re.search(r"\bseed of the\b.*\bsplit\b", a.help or "") and "--split-seed" not in a.option_strings:
                wrong.append(f"{name} {longs}: the split seed is --split-seed")
    assert not wrong, "\n".join(wrong)
    two_ways = {dest: flags for dest, flags in spelled.items() if len(flags) > 1}
    assert not two_ways, f"one dest, several spellings: {two_ways}"


def test_old_spellings_still_work_hidden_and_warn_once(capsys, monkeypatch):
    monkeypatch.setattr(cli_options, "_WARNED", set())
    p = cli.build_parser()
    args = cli.parse(p, ["split", "--data", "d", "--seed", "3", "--val", "0.2", "--test", "0.1"])
    assert (args.split_seed, args.val_fraction, args.test_fraction) == (3, 0.2, 0.1)
    args = cli.parse(p, ["shard", "--data", "d", "--out", "o", "--size", "32", "--per-shard", "5"])
    assert (args.image_size, args.shard_size) == (32, 5)
    args = cli.parse(p, ["fl", "simulate", "--data", "d", "--run-dir", "r"])
    assert args.run_dir == "r"
    cli.parse(p, ["split", "--data", "d", "--seed", "4"])  # a second use: no second warning
    err = capsys.readouterr().err
    assert err.count("--seed is now spelled --split-seed") == 1 and "--run-dir is now spelled --out" in err
    assert main(["split", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--split-seed" in out and "--val-fraction" in out and not re.search(r"--(seed|val|test)(?![-\w])", out)
    # an old spelling is still checked like the new one
    assert main(["split", "--data", "d", "--val", "1.5"]) == 2 and "must be < 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["-v", "split", "--data", "d"], ["split", "--data", "d", "-v"],
    ["tune", "--data", "d", "--out", "o", "--space", "s", "-v"],
    ["tune", "-v", "--data", "d", "--out", "o", "--space", "s"],
    ["fl", "-v", "site", "--data", "d"], ["fl", "site", "--data", "d", "--verbose"],
    ["fl", "partition", "--data", "d", "--out", "o", "-v"],
])
def test_verbose_anywhere(argv):
    assert cli.parse(cli.build_parser(), argv).verbose is True
    quiet = [a for a in argv if a not in ("-v", "--verbose")]
    assert cli.parse(cli.build_parser(), quiet).verbose is False


@pytest.mark.parametrize("argv, hint", [
    (["train", "--data", "d", "--out", "o", "--learning-rate", "0.1"], "--learning-rate (did you mean --lr?)"),
    (["train", "--data", "d", "--out", "o", "--val-fration", "0.1"], "did you mean --val-fraction?"),
    (["fl", "certs", "--out", "o", "--sites", "a", "--dayz", "3"], "did you mean --days?"),
    (["split", "--data", "d", "--split-sed", "1"], "did you mean --split-seed?"),
])
def test_unknown_option_is_one_line_with_a_suggestion(argv, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert hint in err and len(err.strip().splitlines()) == 1 and "usage:" not in err, err


def test_suggest_never_offers_a_hidden_spelling():
    p = cli.build_parser().subparsers["split"]
    known = [s for a in _visible(p) for s in a.option_strings if s.startswith("--")]
    assert "--seed" not in known and cli.suggest("--sed", known) != "--seed"
    assert cli.suggest("--learning-rate", ["--lr", "--epochs"]) == "--lr"
    assert cli.suggest("--bs", ["--batch-size", "--lr"]) == "--batch-size"
    assert cli.suggest("--colour", ["--lr", "--epochs"]) is None


def test_predict_checks_its_inputs_before_loading_the_model(tmp_path, capsys):
    # the model folder does not exist either: the inputs are refused first, each path named once
    missing = tmp_path / "missing.jpg"
    rc = main(["predict", "--model", str(tmp_path / "no-model"), str(missing)])
    out, err = capsys.readouterr()
    assert rc == 1 and out.count(str(missing)) == 1 and "No such file" in out, (out, err)
    assert "no-model" not in out + err  # the model was never opened


def test_serve_without_model_outside_sagemaker_says_what_to_pass(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    monkeypatch.delenv("SM_MODEL_DIR", raising=False)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path / "opt-ml"))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pass --model RUN/model" in err and len(err.strip().splitlines()) == 1, err


def test_one_default_backend():
    subs = cli.build_parser().subparsers
    from medpipe.serve.config import ServeConfig

    defaults = {c: subs[c].get_default("backend") or ServeConfig.backend
                for c in ("predict", "serve", "batch", "evaluate")}
    assert set(defaults.values()) == {"auto"}, defaults


def test_the_label_and_why():
    probs = {"nv": 0.699, "mel": 0.269, "df": 0.032}
    text, flagged = cli.describe({"label": "df", "most_likely": "nv", "probabilities": probs, "decision_rule": "prior"})
    assert flagged and text == "df (0.032; flagged by the balanced-accuracy rule 'prior'; most likely: nv 0.699)"
    # a server of an older version sends no most_likely: the probabilities say it
    text, flagged = cli.describe({"label": "df", "probabilities": probs, "decision_rule": "class_bias"})
    assert flagged and "'class_bias'" in text and "most likely: nv 0.699" in text
    text, flagged = cli.describe({"label": "nv", "most_likely": "nv", "probabilities": probs, "decision_rule": "prior"})
    assert not flagged and text == "nv (0.699)"


def test_predict_prints_the_label_and_the_most_likely_class(trained_run, data_dir, capsys):
    import json

    import pandas as pd

    images = list(pd.read_csv(data_dir / "records.csv")["path"].iloc[:6])
    assert main(["predict", "--model", str(trained_run / "model"), "--json", *images]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert r["most_likely"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["label"] in r["probabilities"] and r["decision_rule"] in ("argmax", "prior", "class_bias")
    assert main(["predict", "--model", str(trained_run / "model"), *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    for r, line in zip(rows, lines):
        head = line.split("  [")[0]
        assert head.startswith(f"{r['image']}: {r['label']} ({r['probabilities'][r['label']]:.3f}")
        assert ("flagged by" in head and f"most likely: {r['most_likely']}" in head) == (r["label"] != r["most_likely"])
    assert (lines[-1].startswith("note: ")) == any(r["label"] != r["most_likely"] for r in rows)
