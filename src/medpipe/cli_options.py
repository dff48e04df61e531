"""The command line's option vocabulary: checked value types, the help texts of the training and serving
options, options generated from the config dataclasses, and the :class:`Parser` (one-line usage errors,
"did you mean" suggestions, older spellings kept as hidden aliases that warn once, ``-v`` anywhere).

``medpipe.cli`` builds every subcommand from these pieces; ``medpipe.fl.cli`` and ``medpipe.tune`` get them
through it, so every parser formats and checks options the same way.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from dataclasses import MISSING, fields

from medpipe.utils import exit_process, to_json  # noqa: F401 - medpipe.cli.exit_process for __main__
from medpipe.config import (COLOR_CONSTANCY, DEVICES, IMBALANCE, MONITORS, TrainConfig)
from medpipe.decision import RULES as DECISION_RULES
from medpipe.models import MODEL_NAMES
from medpipe.preprocess import INTERPOLATIONS

log = logging.getLogger("medpipe")


def _progress() -> bool:
    return sys.stderr.isatty()


# -- option types: a wrong value is refused at parse time with the reason ------------------------------


def number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False):
    """An argparse ``type`` that parses ``kind`` and checks it lies in the range (reason in the error)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def device(text: str) -> str:
    if text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)} (or cuda:N), got {text!r}")


POSITIVE = number(int, 1)
NON_NEGATIVE = number(int, 0)
WORKERS = number(int, 1)
FRACTION = number(float, 0, 1, hi_open=True)

# What each training option means (the option list itself comes from TrainConfig's fields).
TRAIN_HELP = {
    "model": "network architecture",
    "image_size": "square input side in pixels (>= 16)",
    "cache_size": "side of the training images' pixel cache (>= --image-size; 0 = --image-size): larger, each "
                  "training image is a random resized crop of the larger cached image (area share 0.6-1 unless "
                  "--crop-scale says otherwise) shrunk to --image-size; validation, test and serving resize the "
                  "whole image to --image-size",
    "interpolation": "resampling filter for resizing",
    "epochs": "training epochs (>= 1)",
    "budget": "training time instead of an epoch count, e.g. 90s, 25m, 2h: the first epoch is timed and the "
              "epoch count set so the schedule ends at the budget (replaces --epochs)",
    "batch_size": "images per step (>= 1)",
    "lr": "peak learning rate of AdamW (> 0)",
    "weight_decay": "AdamW weight decay (>= 0)",
    "warmup_epochs": "linear warm-up length in epochs before the cosine decay (>= 0)",
    "label_smoothing": "cross-entropy label smoothing in [0, 1)",
    "grad_clip": "gradient-norm clip (0 = off)",
    "imbalance": "class imbalance handling: sampler = class-balanced sampling, weighted_loss = inverse-frequency "
                 "class weights, focal = focal loss, none",
    "focal_gamma": "focal loss gamma (>= 0)",
    "monitor": "validation metric that picks the best checkpoint: val_auc, val_bacc or val_loss",
    "patience": "epochs without improvement before stopping early (>= 1)",
    "seed": "seed of weights, sampling and augmentation",
    "split_seed": "seed of the train/val/test split",
    "val_fraction": "share of lesion groups in validation, in [0, 1)",
    "test_fraction": "share of lesion groups in test, in [0, 1); val + test < 1",
    "deterministic": "deterministic kernels (slower)",
    "device": "auto: CUDA when available, else CPU",
    "precision": "arithmetic of the training steps: auto = bf16 autocast on CUDA, and on a CPU with bf16 "
                 "instructions where a start-up check times it faster (fp32 for --deterministic)",
    "workers": "loader workers (-1 auto: a thread on CPU, processes on CUDA)",
    "threads": "torch CPU threads (0 = all cores)",
    "init_weights": "safetensors file or model package to start from",
    "pretrained": "start from pretrained weights where the architecture has them",
    "dropout": "dropout probability in [0, 1)",
    "tta": "evaluate the test split with flip test-time augmentation",
    "bootstrap": "bootstrap resamples for the confidence intervals (0 = none)",
    "max_steps_per_epoch": "cap on steps per epoch (0 = whole epoch)",
    "track": "log to MLflow: a tracking URI, or alone for $MLFLOW_TRACKING_URI or RUN/../mlflow.db",
    "experiment": "MLflow experiment the run is logged under (with --track)",
    "register": "register the logged model in the MLflow model registry under this name (with --track)",
    "decision_rule": "how the package turns probabilities into a label (fitted on validation): argmax, prior "
                     "(logit adjustment), class_bias (per-class offsets) or class_bias_bagged (class_bias averaged "
                     "over bootstrap fits)",
    "color_constancy": "colour normalisation in the package's preprocessing (none or shades_of_gray)",
    "metadata": "patient metadata as a second model input: none, auto (age, sex and site where the data has "
                "them) or a list such as age,site; dx_type and the label can never be one",
    "metadata_mask": "probability each metadata field is hidden per training image, so predictions without "
                     "metadata fall back to the image",
    "metadata_fusion": "how the metadata meets the image: concat (its encoding beside the pooled image features) "
                       "or metablock (it gates the image feature maps; DenseNets only)",
    "crop_scale": "smallest area share of the random resized crop in [0.05, 1], 1 = no crop (default: 0.6 with a "
                  "--cache-size larger than --image-size, else 1)",
    "color_jitter": "colour jitter strength in [0, 5] (1 = the default jitter)",
    "mixup_alpha": "mixup of each training batch, Beta(alpha, alpha) blend with soft targets (0 = off)",
    "cutmix_alpha": "CutMix of the training batch (0 = off; with mixup, half the mixed batches each)",
    "mix_prob": "share of training batches mixed, in [0, 1]",
    "ema_decay": "exponential moving average of the weights, validated and packaged (0 = off)",
}

SERVE_HELP = {
    "model": "model package folder (default: $SM_MODEL_DIR or /opt/ml/model inside a SageMaker container; "
             "required elsewhere)",
    "host": "address to bind (loopback unless you mean to expose it)",
    "port": "TCP port",
    "backend": "inference runtime",
    "decision_rule": "label rule (medpipe.decision; default: the package's own)",
    "tta": "average each image over its four flips (4 forward passes per image; every answer says tta)",
    "device": "auto: CUDA when available, else CPU",
    "threads": "inference threads (0 = all cores)",
    "streams": "openvino backend: parallel infer streams sharing the threads, each batch split across them (0: "
               "automatic, 2 with at least 2 threads: 1.13x the served images/s of 1 on 2 cores, 3 ms more for a "
               "lone image; 1: one request on every thread, the lowest lone latency)",
    "profile": "limits preset: realtime (SageMaker real-time: 6 MB bodies, 55 s deadline) or async (SageMaker "
               "Asynchronous Inference: 1 GB bodies spooled to disk, 1 h deadline, 4 requests at once; see "
               "medpipe/serve/profiles.py); options given win over it; env MEDPIPE_SERVE_PROFILE",
    "max_body_mb": "largest request body in MB (413 over it; --profile async: 1024)",
    "spool_mb": "a body larger than this many MB is streamed to a temporary file instead of memory",
    "max_pixels": "largest decoded image in pixels (413 over it; a JPEG counts at the reduced scale it is "
                  "decoded at for the model, e.g. 6000x4000 as 750x500)",
    "max_images": "images in one request",
    "max_batch": "images in one forward pass",
    "max_wait_ms": "how long to wait for more images to fill a batch",
    "max_queue": "images admitted at once; more are answered 503",
    "deadline_s": "per-request deadline in seconds (504 after it)",
    "body_timeout_s": "the whole body must arrive within this many seconds (408)",
    "header_timeout_s": "request line and headers must arrive within this many seconds, else the connection "
                        "is closed (408 if part of a request came)",
    "max_connections": "open connections; at the cap a new one displaces a connection that has sent nothing yet "
                       "(of the client address holding the most such, oldest first), else 503",
    "max_connections_per_client": "open connections of one client address (0 = no cap; behind a proxy all "
                                  "clients share its address)",
    "max_requests": "requests with a complete body at once (decoding, queued, running); more are answered 503",
    "min_upload_kbps": "after --upload-grace-s a body must have arrived at this average rate in KB/s, else 408",
    "upload_grace_s": "seconds a body may arrive at any rate before --min-upload-kbps applies",
    "max_uploads_per_client": "bodies arriving at once from one client address; more are answered 503 (0 = no cap)",
    "upload_buffer_mb": "MB all bodies still arriving may hold together; over it 503",
    "memory_ceiling_mb": "resident MB of the server and its decode processes above which bodies are refused "
                         "(503); 0 = after warm-up + 1024",
    "decode_workers": "decode processes",
    "decode_timeout_s": "seconds one image may take to decode; then its process is killed and replaced (422)",
    "decode_memory_mb": "address-space limit of each decode process in MB (413 over it; 0 = none, else >= 256)",
    "max_jpeg_scans": "JPEGs with more scans are refused before decoding (422; scan bombs; 0 = no limit)",
    "max_concurrent_transforms": "requests in flight advertised to SageMaker batch transform",
    "graceful_s": "on SIGTERM finish in-flight requests for at most this long",
    "auth_token_file": "file holding a bearer token every route but /ping and /v2/health/* requires (401 "
                       "without it; not applied under SageMaker, where IAM guards the endpoint)",
    "tls_cert": "PEM certificate (chain) to serve HTTPS with, together with --tls-key",
    "tls_key": "PEM private key of --tls-cert",
    "capture": "write data capture here (SageMaker's JSON Lines under yyyy/mm/dd/hh/; the record's eventId is "
               "returned in X-Medpipe-Event-Id); input fingerprints, never pixels, unless --capture-inputs",
    "capture_sample": "share of /invocations requests captured, e.g. 0.1",
    "capture_inputs": "also capture each request body (base64, as SageMaker does): images are personal data",
    "capture_max_mb": "the capture folder's cap in MB; the oldest files are removed above it",
    "monitor_baseline": "a 'medpipe monitor baseline' folder: export drift statistics of the last "
                        "--monitor-window answers against it as medpipe_monitor_* gauges on /metrics",
    "monitor_window": "answered images in the live monitor's rolling window",
}


def _field_type(f) -> str:
    """'int', 'float', 'str' or 'bool' whether the annotation is a type or a string (postponed annotations)."""
    kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)
    return kind.replace("| None", "").replace("None |", "").strip()


def add_dataclass_options(p: argparse.ArgumentParser, cls, helps: dict, choices: dict, types: dict | None = None,
                          optional_value: dict | None = None) -> None:
    """One ``--option`` per dataclass field, default None (only given values override the dataclass's
    defaults). Booleans get ``--x/--no-x``; ``choices`` and ``types`` (argparse types that check ranges)
    are taken per field, and each option's help is its meaning plus its default (unless the meaning
    already says it)."""
    basic = {"int": int, "float": float, "str": str}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        meaning = helps.get(f.name, "")
        text = meaning if "(default" in meaning else f"{meaning} (default: {default})".strip()
        kind = _field_type(f)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        if f.name in (optional_value or {}):  # --flag alone means this value
            p.add_argument(flag, dest=f.name, nargs="?", const=optional_value[f.name], default=None,
                           metavar="VALUE", help=text)
            continue
        kw = {"choices": choices[f.name]} if f.name in choices else {"metavar": f.name.upper()}
        p.add_argument(flag, dest=f.name, default=None, type=(types or {}).get(f.name, basic.get(kind, str)),
                       help=text, **kw)


def dataclass_values(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def add_config_options(p: argparse.ArgumentParser) -> None:
    """The training options (one per TrainConfig field), for every command that trains (train, fl)."""

    add_dataclass_options(p, TrainConfig, TRAIN_HELP, choices={
        "model": sorted(MODEL_NAMES), "imbalance": IMBALANCE, "monitor": MONITORS, "interpolation": INTERPOLATIONS,
        "decision_rule": DECISION_RULES, "color_constancy": COLOR_CONSTANCY,
    }, types={"device": device}, optional_value={"track": "auto"})


def config_overrides(args) -> dict:
    return dataclass_values(args, TrainConfig)


# -- the parser ----------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, plus: every parser (tune's and fl's too) formats its help with :class:`_HelpFormatter`; a
    usage error is one line (the usage only with --help); an unknown option names the closest known option
    of the same subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # a required option that also has an older spelling: either spelling satisfies it (old_spelling)
        for action in getattr(self, "required_either", []):
            if getattr(namespace, action.dest, None) is None:
                self.error(f"the following arguments are required: {action.option_strings[0]}")
        return namespace, extras

    def unknown(self, extras: list[str]) -> None:
        known = [s for a in self._actions if a.help != argparse.SUPPRESS for s in a.option_strings
                 if s.startswith("--")]
        hints = []
        for extra in extras:
            close = suggest(extra.split("=", 1)[0], known) if extra.startswith("-") else None
            hints.append(f"{extra} (did you mean {close}?)" if close else extra)
        self.error("unrecognized arguments: " + " ".join(hints))


def suggest(flag: str, known: list[str]) -> str | None:
    """The known option ``flag`` most likely meant: the closest spelling, else the one whose name is the
    initials of ``flag``'s words or the other way round (``--learning-rate`` -> ``--lr``)."""
    names = {option.lstrip("-"): option for option in known}  # compared without the dashes every option has
    close = difflib.get_close_matches(flag.lstrip("-").replace("_", "-"), list(names), n=1, cutoff=0.6)
    if close:
        return names[close[0]]
    words = flag.lstrip("-").replace("_", "-").split("-")
    for option in known:
        name = option[2:].split("-")
        if "".join(w[:1] for w in words) == "".join(name) or "".join(w[:1] for w in name) == "".join(words):
            return option
    return None


_WARNED: set[str] = set()  # old spellings already warned about in this process


class _OldSpelling(argparse.Action):
    """A hidden older spelling of an option: stores into the option's own dest and warns once."""

    def __init__(self, option_strings, dest, spelled: str = "", **kwargs):
        self.spelled = spelled
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string not in _WARNED:
            _WARNED.add(option_string)
            print(f"{parser.prog}: warning: {option_string} is now spelled {self.spelled} (the old spelling "
                  "still works)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def old_spelling(p: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` for ``p``'s option ``new`` (same dest, type and checks), hidden from --help."""
    action = next(a for a in p._actions if new in a.option_strings)
    if action.required:  # argparse counts each spelling on its own: Parser.parse_known_args checks either
        action.required = False
        action.help = f"{action.help} (required)"
        p.required_either = [*getattr(p, "required_either", []), action]
    p.add_argument(old, dest=action.dest, type=action.type, choices=action.choices, metavar=action.metavar,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_OldSpelling, spelled=new)


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v`` on ``p`` and every subcommand under it (SUPPRESS keeps a -v given further left)."""
    if not any("--verbose" in a.option_strings for a in p._actions):
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging (and the traceback of an internal error)")
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in a.choices.values():
                add_verbose(child)


def walk(p: argparse.ArgumentParser, name: str = "medpipe"):
    """Every (command name, parser) under ``p``, ``p`` first: 'medpipe', 'medpipe train', 'medpipe fl site'."""
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, child in a.choices.items():
                yield from walk(child, f"{name} {sub_name}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none or already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is d for d in (None, False, argparse.SUPPRESS)) or "(default" in text or not text:
            return text
        return f"{text} (default: %(default)s)"


def _formatter(prog):
    return _HelpFormatter(prog, max_help_position=34, width=110)


def add_split_options(s) -> None:
    """The split's seed and fractions, spelled as train spells them (older spellings hidden, warned)."""
    s.add_argument("--split-seed", type=int, default=0, help=TRAIN_HELP["split_seed"])
    s.add_argument("--val-fraction", type=FRACTION, default=0.15, help=TRAIN_HELP["val_fraction"])
    s.add_argument("--test-fraction", type=FRACTION, default=0.15, help=TRAIN_HELP["test_fraction"])
    for old, new in (("--seed", "--split-seed"), ("--val", "--val-fraction"), ("--test", "--test-fraction")):
        if not any(old in a.option_strings for a in s._actions):
            old_spelling(s, old, new)


def add_metadata_options(s, ingest: bool = False) -> None:
    """Patient metadata: where ingest reads it from, or what predict sends beside each image."""
    if ingest:
        s.add_argument("--metadata-columns", help="where the patient metadata is read from when not under its usual "
                                                  "names (age/age_approx, sex, localization/anatom_site_general), as "
                                                  "INPUT=COLUMN pairs, e.g. age=patient_age,site=location; never "
                                                  "dx_type")
        return
    s.add_argument("--age", type=number(float, 0, 120), help="patient age in years, for a model that takes "
                                                               "metadata (every IMAGE; --metadata-csv per image)")
    s.add_argument("--sex", help="patient sex (a word of the model's vocabulary, e.g. male, female)")
    s.add_argument("--site", help="anatomical site (a word of the model's vocabulary, e.g. back, face)")
    s.add_argument("--metadata-csv", help="CSV with a column 'image' (the IMAGE as given, or its file name) and "
                                          "any of age, sex, site; its values win over --age/--sex/--site")


def add_pixel_options(s, interpolations) -> None:
    """The pixel side and resampling of cached or sharded images, spelled as train spells them."""
    s.add_argument("--image-size", type=number(int, 16), default=64, help=TRAIN_HELP["image_size"])
    s.add_argument("--interpolation", default="bicubic", choices=interpolations, help=TRAIN_HELP["interpolation"])
    old_spelling(s, "--size", "--image-size")
