"""Run a medpipe command with one step made deliberately slow (test-only: production code reads no fault
switches; the tests start the real process through this wrapper instead).

    python -m tests.slow infer SECONDS serve --model ...   # every forward pass of the server sleeps first
    python -m tests.slow shard SECONDS batch ...           # every output shard of a batch job is followed by a sleep

``ray_slow_shards`` is the same for the actors of ``medpipe batch --engine ray``: a Ray worker setup hook.
"""

from __future__ import annotations

import sys
import time


def slow_infer(seconds: float) -> None:
    from medpipe.serve import app

    infer = app.Service.infer

    def slow(self, pixels):
        time.sleep(seconds)
        return infer(self, pixels)

    app.Service.infer = slow


def slow_shards(seconds: float) -> None:
    from medpipe import batch

    write = batch.atomic_write_text

    def slow(path, text, *args, **kwargs):
        write(path, text, *args, **kwargs)
        if str(getattr(path, "name", path)).startswith("part-"):
            time.sleep(seconds)

    batch.atomic_write_text = slow


def ray_slow_shards() -> None:
    """A Ray worker setup hook (``runtime_env={"worker_process_setup_hook": "tests.slow.ray_slow_shards"}``): each
    shard a batch predictor actor answers takes ``$MEDPIPE_TEST_RAY_SLOW_S`` seconds longer, so that a job is
    still running when a test kills a node."""
    import os

    from medpipe import batch

    seconds = float(os.environ.get("MEDPIPE_TEST_RAY_SLOW_S", "0"))
    rows = batch.LocalEngine.rows

    def slow(self, items, decoded):
        time.sleep(seconds)
        return rows(self, items, decoded)

    batch.LocalEngine.rows = slow


def main(argv: list[str]) -> int:
    what, seconds, *command = argv
    {"infer": slow_infer, "shard": slow_shards}[what](float(seconds))
    from medpipe.cli import main as medpipe

    return medpipe(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
