"""Training resource metrics per epoch (metrics.jsonl, the verbose epoch line) and the failure event."""

from __future__ import annotations

import json
import logging
import re

from medpipe.cli import main
from tests.conftest import TINY


def test_resource_metrics_per_epoch_and_a_failure_event(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    logger = logging.getLogger("medpipe")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # as `medpipe -v`: the epoch line's verbose form
    try:
        code = main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--epochs", "2",
                     "--max-steps-per-epoch", "3", "--handler", "tests.faults:NanAtStep:6"])
    finally:
        logger.setLevel(level)
    out = capsys.readouterr().out
    assert code == 2  # epoch 2's NaN batch: the run dies after one recorded epoch
    line = next(x for x in out.splitlines() if x.startswith("epoch=1 "))
    assert re.search(r" rss_mb=\d+ cpu_percent=\d+ data_wait_share=[01]\.\d{3} disk_free_gb=\d+\.\d$", line), line
    epoch, event = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epoch["epoch"] == 1 and epoch["rss_mb"] > 50 and epoch["cpu_percent"] > 0
    assert 0 <= epoch["data_wait_share"] <= 1 and epoch["disk_free_gb"] > 0 and "gpu_memory_gb" not in epoch
    assert event["event"] == "failed" and event["error"] == "NonFiniteLoss" and event["at_epoch"] == 2
    assert "loss became non-finite" in event["reason"] and "epoch" not in event
