"""The layer table of ``src/medpipe``: which module sits on which layer, bottom to top.

A module imports only from its own layer or from below, function-local imports included, and the
import graph has no circle (``tests/test_layers.py`` checks both, and checks that the table in
``docs/architecture.md`` is :func:`markdown_table`'s output). A function-local import of a medpipe
module is only for deferring a heavy optional dependency (torch, onnxruntime, openvino, mlflow,
optuna, flwr) so that ``medpipe --help`` answers at once; each carries ``# deferred: <reason>``.

Where the table departs from the folders, the code showed a better cut:

- ``sagemaker.env`` sits in *base*: it only reads paths and ``SM_*`` variables, and training
  (``train.distributed``) reads it.
- ``sagemaker.layout`` sits with the *model jobs*: the SageMaker ``model.tar.gz`` is one of the
  export formats (``medpipe export --format sagemaker``), built from a package and nothing else.
- ``config`` (the training configuration) and ``recipe`` sit in *training*: only training and what
  drives it read them.
- ``mlflow_model`` (the MLflow pyfunc flavour of a package) sits with ``track`` in *orchestration*.
- ``sagemaker.container`` (the image's ``serve``/``train`` entry) sits in *face*: it is a front to the
  ``medpipe`` command, as ``__main__`` is.

A pattern ``name`` matches the module ``medpipe.name``; ``name.*`` matches every module below the
package ``medpipe.name`` and the package itself. The most specific pattern wins.
"""

from __future__ import annotations

from typing import NamedTuple


class Layer(NamedTuple):
    number: int
    name: str
    modules: tuple[str, ...]
    owns: str


LAYERS: tuple[Layer, ...] = (
    Layer(0, "base", ("__init__", "errors", "utils", "layers", "sagemaker.env"),
          "every user-facing error (exit code, HTTP status); atomic writes, small helpers; SageMaker paths and "
          "SM_* variables"),
    Layer(1, "data", ("data.*",),
          "every input format -> one record table; splits; pixel cache; shards; the only decoder of untrusted "
          "bytes (and its process pool); DICOM; synthetic data"),
    Layer(2, "contracts", ("preprocess", "models", "package"),
          "the preprocessing spec; one model registry; the package format"),
    Layer(3, "maths", ("metrics", "calibration", "decision"),
          "pure functions: AUC, bootstrap, ECE, temperature fitting, decision rules"),
    Layer(4, "inference", ("infer.*",),
          "the Predictor, backends, ONNX session/bytes, INT8/OpenVINO, wire protocol, client, Grad-CAM"),
    Layer(5, "model jobs", ("evaluate", "export", "batch", "batch_ray", "sagemaker.layout", "monitor.*"),
          "the report and plots; exports proven with their runtimes (SageMaker model.tar.gz included); batch "
          "transform; data capture records, baseline statistics and drift checks"),
    Layer(6, "training", ("config", "recipe", "train.*"),
          "the training config and recipe; engine + events, handlers, data sources, checkpoints, distributed"),
    Layer(7, "orchestration", ("pipeline", "track", "tune", "tune_space", "mlflow_model", "fl.*", "sagemaker.*"),
          "fit -> calibrate -> package -> evaluate; MLflow; Optuna; Flower; SageMaker training and hosting entry"),
    Layer(8, "service", ("serve.*",),
          "the HTTP app (SageMaker routes, OIP, page, metrics, limits, batcher, connections)"),
    Layer(9, "face", ("cli", "cli_options", "__main__", "sagemaker.container"),
          "the ``medpipe`` command: one parser, thin subcommands; the container image's entry (serve, train)"),
)


def layer_of(module: str) -> Layer:
    """The layer of ``module`` (``medpipe.x.y`` or ``x.y``); the most specific pattern wins.

    Args:
        module: a dotted module name, with or without the leading ``medpipe.``; ``medpipe`` alone is
            the package's ``__init__``.

    Returns:
        The :class:`Layer` holding it. Raises ``KeyError`` for a module no pattern matches.
    """
    name = module.removeprefix("medpipe").removeprefix(".") or "__init__"
    best: tuple[int, Layer] | None = None
    for layer in LAYERS:
        for pattern in layer.modules:
            if pattern.endswith(".*"):
                base = pattern[:-2]
                hit = name == base or name.startswith(base + ".")
                score = len(base)
            else:
                hit, score = name == pattern, len(pattern) + 1  # an exact name beats a package of that name
            if hit and (best is None or score > best[0]):
                best = (score, layer)
    if best is None:
        raise KeyError(f"medpipe.layers: no layer for module {module!r}; add it to LAYERS")
    return best[1]


def markdown_table() -> str:
    """The layer table as Markdown (``docs/architecture.md`` holds exactly this text).

    Returns:
        A Markdown table, one row per layer, bottom layer first.
    """
    rows = ["| layer | name | modules | owns |", "|---|---|---|---|"]
    for layer in LAYERS:
        mods = ", ".join(f"`{m}`" for m in layer.modules)
        rows.append(f"| {layer.number} | {layer.name} | {mods} | {layer.owns} |")
    return "\n".join(rows) + "\n"
