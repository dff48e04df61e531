"""Generate the documentation site's reference and benchmark pages from the code and the result files.

    python scripts/gen_docs.py OUT_DIR      # write the generated pages under OUT_DIR (to read them)
    mkdocs build --strict                   # the site's hook (docs/hooks.py) calls pages() at build time

Nothing here is hand-copied: every CLI option comes from ``medpipe.cli.build_parser()``, every training
key from ``medpipe.config.TrainConfig``, the error table from ``medpipe.errors.TABLE``, the model.json
schema from ``medpipe.package``, the HTTP routes from the FastAPI app ``medpipe.serve.app.create_app``
builds, and every benchmark figure from ``benchmarks/results/*.json``. Each source is read by one
function, so a change of the code it reads is mended in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# -- small helpers -------------------------------------------------------------------------------------------


def cell(value) -> str:
    """A value as a markdown table cell (pipes escaped, newlines folded)."""
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def code(value) -> str:
    return f"`{value}`" if value not in (None, "") else ""


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(value, digits: int = 3) -> str:
    """A figure rounded for reading; integers stay whole, None/NaN print as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return str(int(value))
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def distribution_name() -> str:
    """The name on the package index (pyproject.toml's [project] name): every install hint in the site uses it."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]


# -- the command line ------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help (what `medpipe --help` lists)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _about(parser: argparse.ArgumentParser, fallback: str = "") -> str:
    """A parser's description, first paragraph only (some are module docstrings)."""
    text = (parser.description or fallback or "").strip().split("\n\n")[0]
    return " ".join(text.split())


def _option_rows(parser: argparse.ArgumentParser) -> list[list]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        names = ", ".join(a.option_strings) if a.option_strings else (a.metavar or a.dest).upper()
        choices = ", ".join(map(str, a.choices)) if a.choices and not isinstance(a.choices, dict) else ""
        default = a.default if a.default not in (None, argparse.SUPPRESS) and a.option_strings else ""
        if isinstance(default, bool) and not default:
            default = ""
        required = "yes" if getattr(a, "required", False) and a.option_strings else ""
        text = a.help or ""
        if default != "":  # the default has its own column: drop a "(default X)" the help text repeats
            text = re.sub(r"\s*\(default:? [^()]*\)\s*$", "", text)
        rows.append([code(names), cell(text), cell(choices), code(default) if default != "" else "", required])
    return rows


def _command_section(path: list[str], parser: argparse.ArgumentParser, level: int, about: str = "") -> list[str]:
    out = [f"{'#' * level} `{' '.join(path)}`\n"]
    if _about(parser, about):
        out.append(_about(parser, about) + "\n")
    out.append("```text\n" + parser.format_usage().strip() + "\n```\n")
    rows = _option_rows(parser)
    if rows:
        out.append(table(["option", "meaning", "choices", "default", "required"], rows))
    helps = _helps(parser)
    for name, sub in _subparsers(parser).items():
        out += _command_section(path + [name], sub, min(level + 1, 4), helps.get(name, ""))
    return out


def cli_reference() -> str:
    """Every command and option, from the parser the ``medpipe`` command itself builds."""
    from medpipe.cli import build_parser

    parser = build_parser()
    subs, helps = _subparsers(parser), _helps(parser)
    out = ["# Command line\n",
           "Generated from `medpipe.cli.build_parser()` when the site is built: every subcommand, every option, "
           "its help text and default, exactly as `medpipe COMMAND --help` prints them.\n",
           table(["command", "what it does"],
                 [[f"[`medpipe {n}`](#medpipe-{n})", helps.get(n) or _about(p)] for n, p in subs.items()]),
           "## Global options\n", table(["option", "meaning", "choices", "default", "required"],
                                       _option_rows(parser))]
    for name, sub in subs.items():
        out += _command_section(["medpipe", name], sub, 2, helps.get(name, ""))
    return "\n".join(out)


# -- the training configuration --------------------------------------------------------------------------------


def _train_help() -> dict[str, str]:
    """Each training key's meaning: the help the command line gives its option (one text for both)."""
    from medpipe import cli

    return dict(getattr(cli, "TRAIN_HELP", {}))


def config_reference() -> str:
    """Every ``TrainConfig`` key, its type, default and meaning."""
    from medpipe.config import TrainConfig

    helps = _train_help()
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append([code(f.name), code(kind), code(json.dumps(default)), helps.get(f.name, ""),
                     code("--" + f.name.replace("_", "-"))])
    doc = (TrainConfig.__doc__ or "").strip()
    return "\n".join([
        "# Training configuration\n",
        "Generated from `medpipe.config.TrainConfig` when the site is built. Defaults, then a YAML file given "
        "with `--config`, then command-line options: the later wins. An unknown key is an error that names it "
        "and the closest known key. Every run folder holds the resolved configuration as `config.yaml`, "
        "which `--config` accepts as it is.\n",
        "> " + " ".join(doc.split()) + "\n" if doc else "",
        table(["key", "type", "default", "meaning", "option"], rows),
    ])


# -- errors ----------------------------------------------------------------------------------------------------


def errors_reference() -> str:
    """The error table: class, machine code, exit code, HTTP status, meaning (errors.TABLE + docstrings)."""
    from medpipe import errors

    rows = []
    for cls, (exit_code, status) in errors.TABLE.items():
        doc = " ".join((cls.__doc__ or "").split())
        depth = len([c for c in cls.__mro__ if c in errors.TABLE]) - 1
        name = ("↳ " * max(0, depth - 1)) + cls.__name__
        rows.append([code(name), code(getattr(cls, "code", "")), exit_code,
                     "its own" if cls is errors.HttpError else status, doc])
    internal = getattr(errors, "INTERNAL", (1, 500))
    return "\n".join([
        "# Errors\n",
        "Generated from `medpipe.errors.TABLE` when the site is built. Every error a user can act on has a "
        "class, a short machine `code` (the `error` field of a JSON error body, the `error` column of a batch "
        "row), the command-line exit code and the HTTP status it maps to. The command line prints one line "
        "with the reason and never a traceback (`-v` shows it for a bug).\n",
        table(["class", "code", "exit", "HTTP", "meaning"], rows),
        f"Anything else is a bug: exit code {internal[0]}, HTTP {internal[1]} with the body "
        "`{\"error\": \"internal_error\"}`. A usage mistake on the command line (an unknown option, a value out "
        "of range) exits 2 before anything runs.\n",
    ])


# -- model.json ------------------------------------------------------------------------------------------------


def package_schema_rows() -> tuple[list[str], list[list]]:
    """The model.json table (header, rows): from ``PackageMeta.describe()`` (field, type, meaning) where the
    package module has it, else from the older ``SCHEMA``/``OPTIONAL`` rule lists. Only this function reads them."""
    from medpipe import package

    meta_type = getattr(package, "PackageMeta", None)
    if meta_type is not None and hasattr(meta_type, "describe"):
        rows = [[code(d.get("field")), code(d.get("type", "")), d.get("meaning", "")] for d in meta_type.describe()]
        return ["key", "type", "meaning"], rows
    rows = [[code(key), want, "yes"] for key, _check, want in package.SCHEMA]
    rows += [[code(key), f"an object ({kind.__name__})", "no"] for key, kind in package.OPTIONAL.items()]
    return ["key", "must be", "required"], rows


def package_reference() -> str:
    from medpipe import package

    fmt = getattr(package, "PACKAGE_FORMAT", None)
    return "\n".join([
        "# Model package (`model.json`)\n",
        "Generated from `medpipe.package` when the site is built. A model package is a folder with "
        "`weights.safetensors` and `model.json`; every command that loads a model checks `model.json` "
        "against these rules and the sha256 of the weights before it reads a tensor, and names the first "
        "key that is wrong.\n",
        f"Current format: `{fmt}`.\n" if fmt else "",
        table(*package_schema_rows()),
        "The INT8 model and its record (`model.int8.onnx`, `int8.json`) sit beside `model.json` when "
        "`medpipe quantize` made them ([CPU speed](../guides/cpu-speed.md)).\n",
    ])


# -- HTTP routes -----------------------------------------------------------------------------------------------

# What each route does. The route list itself comes from the app; the build fails when a route has no text
# here or a text names a route the app does not have, so the two cannot drift apart.
ROUTE_TEXT = {
    ("GET", "/"): "the web page: pick or drop an image, see the label and why, every probability and a Grad-CAM "
                  "heat map; no external assets, strict Content-Security-Policy",
    ("GET", "/ping"): "200 with an empty body once the model is loaded, verified and warmed up (SageMaker's "
                      "health check)",
    ("GET", "/execution-parameters"): "`MaxConcurrentTransforms`, `BatchStrategy`, `MaxPayloadInMB` for "
                                      "SageMaker batch transform",
    ("GET", "/metrics"): "Prometheus text: requests by route and status, latency and batch-size histograms, "
                         "queue depth, refusals",
    ("POST", "/invocations"): "predict: image bytes (JPEG, PNG, BMP, WebP), `application/x-npy`, JSON "
                              "`{\"images\": [base64, ...]}` or DICOM in; JSON or CSV out (SageMaker's route)",
    ("POST", "/explain"): "one image in, its prediction and a Grad-CAM PNG out (what the web page uses)",
    ("POST", "/endpoints/{name}/invocations"): "`/invocations` in the SageMaker Runtime API's shape (boto3 "
                                               "`invoke_endpoint` with `endpoint_url` here): the same answer; "
                                               "errors as `ModelError` (424) with `OriginalStatusCode`",
    ("GET", "/v2/health/live"): "Open Inference Protocol: the server is up",
    ("GET", "/v2/health/ready"): "Open Inference Protocol: the model is loaded and warmed up",
    ("GET", "/v2"): "Open Inference Protocol: server metadata",
    ("GET", "/v2/models/{name}"): "Open Inference Protocol: model metadata (inputs, outputs, class names)",
    ("GET", "/v2/models/{name}/versions/{version}"): "the same, for a version",
    ("GET", "/v2/models/{name}/ready"): "Open Inference Protocol: model readiness",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "the same, for a version",
    ("POST", "/v2/models/{name}/infer"): "Open Inference Protocol inference: `image_bytes` (BYTES) or `image` "
                                         "(FP32 N x 3 x S x S) in, `probabilities` and `label` out",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "the same, for a version",
}


class _NoModel:
    """Stands in for a loaded predictor: building the app registers the routes and reads at most the
    preprocessing spec and the names; no weights are loaded and the app is never started."""

    classes: tuple = ()
    name, version, tta, decision_rule = "model", "0", False, None

    def __init__(self):
        from medpipe.preprocess import PreprocessSpec

        self.spec = PreprocessSpec()


def http_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app ``medpipe serve`` runs (built without a model, never started)."""
    from medpipe.serve.app import create_app
    from medpipe.serve.config import ServeConfig

    app = create_app(_NoModel(), ServeConfig())
    app = getattr(app, "app", app)  # the outermost ASGI layer wraps the FastAPI app
    routes = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or ()):
            if m != "HEAD" and getattr(r, "include_in_schema", True) is not None:
                routes.append((m, r.path))
    return routes


def http_reference() -> str:
    routes = http_routes()
    missing = [r for r in routes if r not in ROUTE_TEXT]
    stale = [r for r in ROUTE_TEXT if r not in routes]
    if missing or stale:
        raise SystemExit(f"gen_docs: the route texts disagree with the app: no text for {missing}, "
                         f"text for routes the app lacks {stale} (scripts/gen_docs.py ROUTE_TEXT)")
    return "\n".join([
        "# HTTP routes\n",
        "Generated from the FastAPI app that `medpipe serve` runs (`medpipe.serve.app.create_app`) when the "
        "site is built. Nothing else is routed (no docs pages, no redirects). Every error is a JSON body "
        "`{\"error\": code, \"message\": ..., \"request_id\": ...}`; the codes and statuses are in "
        "[Errors](errors.md) and the limits in [Serving](../guides/serving.md#limits).\n",
        table(["method", "path", "what"], [[m, code(p), ROUTE_TEXT[(m, p)]] for m, p in routes]),
    ])


# -- benchmarks ------------------------------------------------------------------------------------------------

SCRIPTS = {"quality": "quality.py", "batch": "batch.py", "batch_cuda": "batch.py", "ingest": "ingest.py",
           "imbalance": "imbalance.py", "imbalance_cuda": "imbalance.py", "scaling": "scaling.py",
           "scaling_cuda": "scaling.py", "serve_load": "serve_load.py", "serve_load_cuda": "serve_load.py",
           "int8_variants_cpu": "int8_variants.py", "int8_openvino_cpu": "int8_openvino.py",
           "int8_gate_real_64": "int8_gate.py"}


def load_results() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def machine_text(m: dict | None) -> str:
    if not m:
        return "not recorded"
    parts = [m.get("cuda") or "CPU only", f"{m.get('cpus', '?')} CPU cores"]
    parts += [f"torch {m['torch']}" for _ in [0] if m.get("torch")]
    parts += [f"Python {m['python']}" for _ in [0] if m.get("python")]
    return ", ".join(parts)


def command_text(name: str, d: dict) -> str:
    """The command as recorded: the script and the settings it wrote (None/False/empty left out)."""
    if d.get("command"):  # a result recorded by hand names its command itself
        return str(d["command"])
    bench = str(d.get("benchmark", ""))
    script = SCRIPTS.get(bench) or next((s for k, s in SCRIPTS.items() if bench.startswith(k)), None) \
        or (f"{bench.rsplit('_', 2)[0]}.py" if bench else "?")
    args = []
    for k, v in (d.get("settings") or {}).items():
        if v in (None, False, "", []) or k in ("out", "work", "data", "images"):
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        else:
            for one in (v if isinstance(v, list) else [v]):
                args.append(f"{flag} {one}")
    return f"python benchmarks/{script} " + " ".join(args)


def _flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and d and all(not isinstance(x, (dict, list)) for x in d):
        out.append((prefix, ", ".join(map(str, d))))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _flatten(v, f"{prefix}[{i}]")
    else:
        out.append((prefix, d))
    return out


def _header(name: str, d: dict) -> list[str]:
    lines = [f"### `{name}`\n",
             table(["", ""], [["benchmark", d.get("benchmark", "")], ["recorded", d.get("when", "not recorded")],
                              ["machine", machine_text(d.get("machine"))],
                              ["command (from the recorded settings)", code(command_text(name, d))]])]
    if d.get("what") or d.get("note"):
        lines.append(" ".join(str(d.get(k)) for k in ("what", "note") if d.get(k)) + "\n")
    if d.get("merged_from"):
        lines.append("Merged from:\n")
        lines.append(table(["file", "renamed", "recorded", "machine"],
                           [[code(m.get("file")), m.get("renamed") or "", m.get("when", ""),
                             machine_text(m.get("machine"))] for m in d["merged_from"]]))
    return lines


def quality_summary(d: dict) -> str:
    """Mean ± SD over split seeds per recipe, from a quality.py result file."""
    rows = []
    for recipe, s in (d.get("summary") or {}).items():
        def ms(key):
            v = s.get(key) or {}
            if v.get("mean") is None:
                return "–"
            return num(v["mean"]) + (f" ± {num(v['sd'])}" if v.get("sd") is not None else "")
        n = (s.get("macro_auc") or {}).get("n", "")
        rows.append([code(recipe), n, ms("macro_auc"), ms("balanced_accuracy"), ms("mel_sensitivity_at_spec80"),
                     ms("mel_sensitivity_at_spec90"), ms("ece"), ms("epochs")])
    return table(["recipe", "seeds", "test macro AUC", "balanced accuracy", "mel sens @80% spec",
                  "mel sens @90% spec", "ECE", "epochs"], rows)


def quality_runs(d: dict) -> str:
    rows = []
    for recipe, runs in (d.get("runs") or {}).items():
        for r in runs:
            rows.append([code(recipe), r.get("seed", ""), num(r.get("macro_auc")), num(r.get("balanced_accuracy")),
                         r.get("decision_rule", ""), r.get("best_epoch", ""), r.get("epochs", ""),
                         num(r.get("train_seconds"), 0) if r.get("train_seconds") else "–",
                         num(r.get("seconds"), 0) if r.get("seconds") else "–"])
    return table(["recipe", "split seed", "macro AUC", "balanced accuracy", "rule", "best epoch", "epochs",
                  "training s", "run s"], rows) + (
        "\n*training s*: seconds of training; *run s*: of the whole run, as recorded (a run resumed for its "
        "evaluation counts only that last part).\n")


def quality_recipes(d: dict) -> str:
    return table(["recipe", "settings over the defaults of its time"],
                 [[code(k), ", ".join(f"{a}: {b}" for a, b in v.items()) or "(none)"]
                  for k, v in (d.get("recipes") or {}).items()])


def quality_page(results: dict[str, dict]) -> str:
    out = ["# Quality benchmark results\n",
           "Generated from `benchmarks/results/quality*.json` (written by `benchmarks/quality.py`) when the site is "
           "built; the story of these runs is on [Benchmarks](index.md). Test split of the real HAM10000 dev set "
           "(1,984 images, 297 test images per split seed), 64x64, from scratch; mean ± SD over split seeds.\n"]
    for name, d in results.items():
        if d.get("benchmark") != "quality":
            continue
        out += _header(name, d)
        out += ["Recipes:\n", quality_recipes(d), "Summary:\n", quality_summary(d), "Runs:\n", quality_runs(d)]
        verdict = d.get("verdict") or {}
        for recipe, v in verdict.items():
            bits = [f"{metric} {num(x.get('difference'))} against `{x.get('against', 'default')}` "
                    f"(spread {num(x.get('spread'))}, beats by more than the spread: {x.get('beats_by_more_than_spread')})"
                    for metric, x in v.items() if isinstance(x, dict)]
            out.append(f"Verdict for `{recipe}`: " + "; ".join(bits) + ".\n")
    return "\n".join(out)


def other_page(results: dict[str, dict]) -> str:
    out = ["# Speed benchmark results\n",
           "Generated from the other `benchmarks/results/*.json` files when the site is built: every recorded "
           "figure, with the machine, the date and the command. What they mean is on [Benchmarks](index.md).\n"]
    for name, d in results.items():
        if d.get("benchmark") == "quality":
            continue
        out += _header(name, d)
        skip = ("benchmark", "when", "machine", "settings", "what", "note", "merged_from", "command")
        if isinstance(d.get("steps"), list):  # timed steps of a walkthrough (elsewhere "steps" is a count)
            out.append(steps_table(d))
            skip += ("steps",)
        rows = [[code(k), num(v) if not isinstance(v, str) else v]
                for k, v in _flatten({k: v for k, v in d.items() if k not in skip})]
        out.append(table(["figure", "value"], rows[:200]))
    return "\n".join(out)


def steps_table(d: dict) -> str:
    """A walkthrough's steps as run by hand: each command and the seconds it took."""
    return table(["step", "command", "seconds"],
                 [[s.get("step", ""), code(s.get("command")), num(s.get("seconds"), 2)] for s in d["steps"]])


def steps_macro(name: str) -> str:
    """The timed steps of one hand-run result file (``<!-- gen:walkthrough-steps FILE -->``)."""
    d = json.loads((RESULTS / name).read_text())
    return steps_table(d) + (f"\n<small>Generated from `benchmarks/results/{name}` "
                             f"(recorded {d.get('when', '?')}; {machine_text(d.get('machine'))}).</small>\n")


def quality_macro(name: str) -> str:
    """The summary table of one quality file, for a page to embed (``<!-- gen:quality-summary FILE -->``)."""
    path = RESULTS / name
    if not path.is_file():
        raise SystemExit(f"gen_docs: a page embeds {name}, which is not in benchmarks/results/")
    d = json.loads(path.read_text())
    return (quality_summary(d) + f"\n<small>Generated from `benchmarks/results/{name}` "
            f"(recorded {d.get('when', '?')}).</small>\n")


def runs_macro(name: str) -> str:
    """The per-run table of one quality file (``<!-- gen:quality-runs FILE -->``)."""
    d = json.loads((RESULTS / name).read_text())
    return quality_runs(d) + f"\n<small>Generated from `benchmarks/results/{name}`.</small>\n"


MACROS = {"quality-summary": quality_macro, "quality-runs": runs_macro, "walkthrough-steps": steps_macro}


# -- entry points ----------------------------------------------------------------------------------------------


def pages() -> dict[str, str]:
    """Every generated page: path under docs/ -> markdown."""
    results = load_results()
    return {
        "reference/cli.md": cli_reference(),
        "reference/config.md": config_reference(),
        "reference/errors.md": errors_reference(),
        "reference/model-json.md": package_reference(),
        "reference/http.md": http_reference(),
        "benchmarks/quality.md": quality_page(results),
        "benchmarks/speed.md": other_page(results),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "site-generated"
    for rel, text in pages().items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
        print(out / rel)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main(sys.argv[1:]))
