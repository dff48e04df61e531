"""The documentation site: the strict build (broken links and missing pages fail it), the generated
reference against the code it documents, the README's limits, and the HAM10000 walkthrough's script."""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_docs  # noqa: E402
from tests._server import free_port  # noqa: E402

mkdocs = pytest.importorskip("mkdocs", reason="the dev extra's mkdocs is not installed")


def _env() -> dict:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_site_builds_strict_with_every_page(tmp_path):
    """`make docs`' build: strict, every nav page and generated page present, every example included."""
    r = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stderr[-4000:]
    site = tmp_path / "site"
    for page in ("getting-started/ham10000.html", "reference/cli.html", "reference/config.html",
                 "reference/errors.html", "reference/model-json.html", "reference/http.html",
                 "reference/python-api.html", "benchmarks/quality.html", "benchmarks/speed.html",
                 "model-card.html", "changelog.html", "tutorials/quickstart.ipynb"):
        assert (site / page).is_file(), page
    ham = (site / "getting-started/ham10000.html").read_text()
    assert "medpipe ingest" in ham and "{{ dist }}" not in ham and "gen:quality" not in ham
    assert "0.923" in ham  # the default recipe's mean macro AUC, generated from its result file
    assert "medpipe.infer.predictor.Predictor" in (site / "reference/python-api.html").read_text()
    assert "InferenceSession" in (site / "guides/exports.html").read_text()  # the included example


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The site's own validation settings and hooks turn a link to a missing page into a failed build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the guide](guides/missing.md).\n")
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    cfg.update(docs_dir=str(docs), nav=[{"Home": "index.md"}], plugins=["search"],
               hooks=[str(ROOT / "scripts" / "mkdocs_hooks.py")], exclude_docs="")
    config = tmp_path / "mkdocs.yml"
    config.write_text(yaml.safe_dump(cfg))
    r = _build(config, tmp_path / "site")
    assert r.returncode != 0 and "guides/missing.md" in r.stderr


def _options(parser: argparse.ArgumentParser, path: str = "medpipe"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif action.option_strings and action.help != argparse.SUPPRESS and not isinstance(
                action, argparse._HelpAction) and path != "medpipe":
            yield path, action.option_strings[0]


def test_generated_reference_holds_every_option_key_error_and_route():
    from medpipe import errors
    from medpipe.cli import build_parser
    from medpipe.config import TrainConfig

    cli = gen_docs.cli_reference()
    for command, option in _options(build_parser()):
        section = cli.split(f"`{command}`\n", 1)[1] if f"`{command}`\n" in cli else ""
        assert f"`{option}" in section or f", {option}" in section, (command, option)
    config = gen_docs.config_reference()
    for f in dataclasses.fields(TrainConfig):
        assert f"`{f.name}`" in config, f.name
    table = gen_docs.errors_reference()
    for cls, (code, status) in errors.TABLE.items():
        assert re.search(rf"{cls.__name__}` \| `{cls.code}` \| {code} \|", table), cls
    http = gen_docs.http_reference()
    for method, path in gen_docs.http_routes():
        assert f"| {method} | `{path}` |" in http
    assert "`weights_sha256`" in gen_docs.package_reference()


def test_benchmark_pages_come_from_every_result_file():
    results = gen_docs.load_results()
    pages = gen_docs.quality_page(results) + gen_docs.other_page(results)
    for name in results:
        assert f"### `{name}`" in pages, name
    summary = gen_docs.quality_macro("quality_default_switch.json")
    assert "0.923 ± 0.008" in summary and "0.567 ± 0.063" in summary  # default: macro AUC, balanced accuracy


def test_tune_space_example_is_a_valid_space():
    from medpipe.tune import load_space

    """The tuning guide's space file passes medpipe tune's own checks (every key, every corner of the space)."""
    space = load_space(ROOT / "docs" / "examples" / "tune_space.yaml")
    assert space.objective == "val_auc" and space.trials == 20
    assert {p.name for p in space.params} == {"lr", "label_smoothing", "crop_scale", "color_constancy"}


def test_install_hints_use_the_distribution_name_from_pyproject():
    """Every `pip install` of an extra in the site goes through {{ dist }} (pyproject's name)."""
    bad = []
    for page in (ROOT / "docs").rglob("*.md"):
        for line in page.read_text().splitlines():
            if re.search(r"pip install\s+['\"]?[\w.-]+\[", line) and "{{ dist }}[" not in line:
                bad.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert not bad, bad


def test_readme_is_short_and_points_into_the_site():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, len(lines)
    assert "make test" in text and "make demo" in text
    assert "not a medical device" in text
    assert "±" not in text and "benchmarks/results" not in text  # no benchmark history
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).is_file(), link


@pytest.mark.slow
def test_ham10000_walkthrough_script_reaches_a_served_model(synth_dir, tmp_path):
    """The commands of "Train on your HAM10000 download", as written, on a small synthetic Dataverse zip:
    ingest, train, report, predict, serve and an answer over HTTP."""
    zips = sorted(synth_dir.glob("*.zip"))
    source = zips[0] if zips else synth_dir
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "medpipe").write_text(f"#!/bin/sh\nexec {sys.executable} -m medpipe \"$@\"\n")
    (bindir / "medpipe").chmod(0o755)
    env = _env()
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["PORT"] = str(free_port())
    work = tmp_path / "ham"
    r = subprocess.run(["bash", str(ROOT / "docs" / "examples" / "ham10000.sh"), str(source), str(work),
                        "--model", "densenet-test", "--image-size", "32", "--epochs", "1", "--bootstrap", "0",
                        "--threads", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert (work / "run" / "model" / "model.json").is_file()
    answer = r.stdout.strip().splitlines()[-1]
    assert '"predictions"' in answer and '"label"' in answer, answer
    shutil.rmtree(work / "data", ignore_errors=True)
