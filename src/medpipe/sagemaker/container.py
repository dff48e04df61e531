"""The container image's entry point (``Containerfile``): SageMaker's bring-your-own-container contract.

SageMaker starts a hosting container as ``docker run IMAGE serve`` and a training container as
``docker run IMAGE train``; KServe and a plain ``docker run IMAGE`` get ``serve`` (the image's CMD).

    serve [OPTIONS]   ``medpipe serve`` on 0.0.0.0, the port ``SAGEMAKER_BIND_TO_PORT`` or 8080, the model
                      from ``SM_MODEL_DIR`` or ``/opt/ml/model``: /ping (503 until the model is loaded and
                      warmed up), /invocations, /execution-parameters, /metrics and the Open Inference
                      Protocol under /v2 (KServe's health probes included). SIGTERM drains in-flight
                      requests (``--graceful-s``, 25 s, inside SageMaker's 30 s) and exits 0.
    train [--key value ...]
                      the script-mode training entry (:func:`medpipe.sagemaker.training.main`, what
                      ``sagemaker_entry.py`` runs) against ``/opt/ml/input``: hyperparameters from
                      ``input/config/hyperparameters.json``, data from the ``train`` channel, the
                      deployable package written to ``/opt/ml/model``, the reason of a failure to
                      ``/opt/ml/output/failure``.
    anything else     the ``medpipe`` command itself (``docker run IMAGE predict --model ...``).

The process is PID 1 in the container, where a signal without a handler is ignored (and lost): SIGTERM
gets one before anything heavy is imported (exit 143), so a stop during start-up (imports, model loading,
ingest) is not left to SIGKILL; the server and the training loop replace it with their draining handlers
while they run.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_SIGTERM = 143


def _stop(signum, frame):  # noqa: ARG001 - the signal module's signature
    raise SystemExit(EXIT_SIGTERM)


if __name__ == "__main__":  # the image's entry: the handler before the imports below, which take seconds
    signal.signal(signal.SIGTERM, _stop)

from medpipe.cli import main as medpipe_main  # noqa: E402 - after the SIGTERM handler, on purpose
from medpipe.sagemaker import training  # noqa: E402
from medpipe.utils import exit_process  # noqa: E402

USAGE = "usage: IMAGE serve [medpipe serve options] | IMAGE train [--hyperparameter value ...] | IMAGE <medpipe command>"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        os.environ.setdefault("MEDPIPE_HOST", "0.0.0.0")  # noqa: S104 - the container's contract; the image sets it too
        return medpipe_main(["serve", *rest])
    if command == "train":
        return training.main(rest)
    return medpipe_main(args)


if __name__ == "__main__":  # pragma: no cover
    exit_process(main())
