"""The command line: one parser, options checked at parse time, user mistakes never 'internal error',
and one error table (exit code + HTTP status) for every user-facing error."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import medpipe
from medpipe import cli, errors
from medpipe.cli import main

COMMANDS = {"synth", "ingest", "split", "cache", "train", "evaluate", "predict", "serve", "batch", "shard",
            "export", "package", "quantize", "tune", "fl", "runs", "monitor"}


def _usage_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err
    return err


def test_one_parser_without_an_import_hook():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("medpipe.commands")
    assert "except ImportError" not in inspect.getsource(cli)
    assert set(cli.build_parser().subparsers) == COMMANDS


def test_choices_come_from_their_constants():
    from medpipe.config import IMBALANCE
    from medpipe.data.sources import FORMATS as INGEST_FORMATS
    from medpipe.export import FORMATS as EXPORT_FORMATS
    from medpipe.infer.predictor import BACKENDS
    from medpipe.serve.config import ServeConfig

    subs = cli.build_parser().subparsers

    def choices(cmd, dest):
        return tuple(next(a for a in subs[cmd]._actions if a.dest == dest).choices)

    for cmd in ("predict", "batch", "evaluate", "serve"):
        assert choices(cmd, "backend") == tuple(BACKENDS)
        # one default runtime: the one serve measures and uses
        assert (subs[cmd].get_default("backend") or ServeConfig.backend) == "auto", cmd
    assert choices("export", "format") == tuple(EXPORT_FORMATS)
    assert choices("ingest", "format") == tuple(INGEST_FORMATS)
    assert choices("train", "imbalance") == tuple(IMBALANCE)
    # evaluate measures the runtime that serves: the same backend default
    assert subs["evaluate"].get_default("backend") == ServeConfig.backend
    # `package` is `export --format sagemaker`, not a second implementation
    assert subs["package"].get_default("func") is subs["export"].get_default("func") is cli.cmd_export
    assert subs["package"].get_default("format") == "sagemaker"


def test_parser_and_usage_errors_import_neither_torch_nor_monai(tmp_path):
    """`medpipe --help` and a usage error stay fast because building the parser, parsing, and refusing a
    missing --data folder import only light modules (torch and MONAI load inside the commands that run)."""
    code = ("import sys; from medpipe import cli; cli.build_parser(); "
            f"rc = cli.main(['train', '--data', {str(tmp_path / 'missing')!r}, '--out', {str(tmp_path / 'run')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "[]"], (done.stdout, done.stderr)
    assert "no such folder" in done.stderr


def test_dataclass_options_keep_their_types():
    p = cli.build_parser()
    args = cli.parse(p, ["serve", "--port", "9000", "--max-body-mb", "2.5", "--max-images", "3"])
    assert (args.port, args.max_body_mb, args.max_images) == (9000, 2.5, 3)
    args = cli.parse(p, ["train", "--data", "d", "--out", "o", "--epochs", "3", "--lr", "0.01", "--no-pretrained"])
    assert (args.epochs, args.lr, args.pretrained) == (3, 0.01, False)


def test_verbose_before_or_after_the_subcommand():
    p = cli.build_parser()
    assert cli.parse(p, ["-v", "split", "--data", "d"]).verbose is True
    assert cli.parse(p, ["split", "--data", "d", "-v"]).verbose is True
    assert cli.parse(p, ["split", "--data", "d"]).verbose is False


def test_unknown_long_option_suggests_the_closest(capsys):
    err = _usage_error(["train", "--data", "d", "--out", "o", "--epocs", "3"], capsys)
    assert "--epocs" in err and "did you mean --epochs?" in err
    err = _usage_error(["batch", "--model", "m", "--input", "i", "--output", "o", "--bach-size", "4"], capsys)
    assert "did you mean --batch-size?" in err


@pytest.mark.parametrize("argv, says", [
    (["train", "--val-fraction", "0.6", "--test-fraction", "0.6"], "'val_fraction' + 'test_fraction' must be < 1"),
    (["train", "--dropout", "3"], "'dropout' must be in [0, 1)"),
    (["train", "--patience", "0"], "'patience' must be >= 1"),
    (["train", "--grad-clip", "-1"], "'grad_clip' must be >= 0"),
    (["train", "--weight-decay", "-0.1"], "'weight_decay' must be >= 0"),
    (["train", "--warmup-epochs", "-2"], "'warmup_epochs' must be >= 0"),
    (["train", "--bootstrap", "-5"], "'bootstrap' must be >= 0"),
    (["train", "--epochs", "two"], "--epochs: invalid int value"),
    (["train", "--device", "gpu"], "expected one of auto, cpu, cuda"),
    (["train", "--imbalance", "oversample"], "invalid choice: 'oversample'"),
    (["split", "--data", "d", "--val-fraction", "0.7", "--test-fraction", "0.5"],
     "--val-fraction + --test-fraction must be < 1"),
    (["split", "--data", "d", "--val-fraction", "1.5"], "must be < 1"),
    (["split", "--data", "d", "--val", "1.5"], "must be < 1"),  # the old spelling, checked the same
    (["evaluate", "--model", "m", "--data", "d", "--bootstrap", "-1"], "must be >= 0"),
    (["batch", "--model", "m", "--input", "i", "--output", "o", "--batch-size", "0"], "must be >= 1"),
    (["batch", "--model", "m", "--input", "i", "--output", "o", "--max-error-rate", "nan"], "finite"),
    (["serve", "--port", "70000"], "must be <= 65535"),
    (["export", "--model", "m", "--format", "onnx"], "the following arguments are required: --out"),
])
def test_out_of_range_options_refused_at_parse_time(argv, says, tmp_path, capsys):
    if argv[0] == "train":
        argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *argv[1:]]
    err = _usage_error(argv, capsys)
    assert says in err, err
    lines = [line for line in err.splitlines() if "warning: --val is now spelled" not in line]
    assert len(lines) == 1 and "usage:" not in err and f"medpipe {argv[0]} --help" in err  # one line, no usage
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_help_lists_choices_and_meanings(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "{sampler,weighted_loss,focal,none}" in out
    assert "sampler = class-balanced sampling" in out and "(default: none)" in out
    assert "mixup" in out and "(default: 0.2)" in out and "(default: 0.999)" in out  # the recipe's defaults, explained
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    from medpipe.export import FORMATS

    assert "{" + ",".join(FORMATS) + "}" in out and "MONAI bundle folder" in out and "(default: None)" not in out


def test_data_mistakes_are_explained_not_internal_errors(synth_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such folder" in err and "internal error" not in err
    rc = main(["evaluate", "--model", str(tmp_path), "--data", str(synth_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "internal error" not in err
    rc = main(["split", "--data", str(synth_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "a raw dataset" in err and f"medpipe ingest {synth_dir} --out DATA" in err


def test_serve_without_the_serve_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` sees when it is not installed
    rc = main(["serve", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'medpipe-imaging[serve]'" in err and "internal error" not in err


# -- the error table ---------------------------------------------------------------------------------


def _all_modules():
    for info in pkgutil.walk_packages(medpipe.__path__, "medpipe."):
        if info.name != "medpipe.__main__":  # that one runs the command line
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional extra that is not installed
                continue


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_user_error_lives_in_errors_py_with_a_row_in_the_table():
    _all_modules()
    found = set(_subclasses(errors.MedpipeError))
    assert found, "no error classes found"
    for cls in found:
        assert cls.__module__ == "medpipe.errors", f"{cls.__module__}.{cls.__name__} is defined outside errors.py"
        assert cls in errors.TABLE, f"{cls.__name__} has no row in errors.TABLE"
    from medpipe.data import imageio, sources
    from medpipe.infer import protocol

    assert issubclass(sources.IngestError, errors.MedpipeError)
    assert issubclass(protocol.HttpError, errors.MedpipeError)
    assert not hasattr(imageio.ImageError("x"), "http_status")  # the data layer knows nothing of HTTP


def test_table_maps_exit_codes_and_statuses():
    assert errors.http_status(errors.UnsupportedFormatError("x")) == 415
    assert errors.http_status(errors.ImageTooLargeError("x")) == 413
    assert errors.http_status(errors.CorruptImageError("x")) == 400
    assert errors.http_status(errors.HttpError(503, "overloaded", "busy")) == 503
    assert errors.http_status(KeyError("x")) == 500 and errors.exit_code(KeyError("x")) == 1
    assert errors.exit_code(errors.TrainingInterrupted("stopped")) == 143
    assert errors.exit_code(errors.ConfigError("bad")) == 2
    # an error's code is fixed by its class (never mutated after creation)
    assert errors.UnreadableFileError("cannot read").code == "unreadable_file"
