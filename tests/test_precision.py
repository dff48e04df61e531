"""bf16 training on CPU (issue 16 item 3): a bf16 run trains, records its precision, and resumes exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


def _cfg(**kw):
    from medpipe.config import make_config

    return make_config({"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 3,
                        "bootstrap": 0, "threads": 1, "workers": 0, "deterministic": True, "warmup_epochs": 0.5,
                        "precision": "bf16", **kw})


def test_bf16_run_resumes_exactly_from_a_bf16_checkpoint(data_dir, tmp_path):
    from safetensors.torch import load_file

    from medpipe.pipeline import run
    from medpipe.train.checkpoint import load_checkpoint
    from medpipe.train.engine import TrainingInterrupted

    sys.path.insert(0, str(Path(__file__).parent))
    from faults import SigtermAtStep

    straight = run(data_dir, tmp_path / "a", _cfg(), evaluate_test=False)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["precision"] for m in lines] == ["bf16", "bf16"] and all(torch.isfinite(torch.tensor(m["train_loss"]))
                                                                        for m in lines)
    with pytest.raises(TrainingInterrupted):  # stopped mid-epoch 2: the checkpoint is a bf16 run's
        run(data_dir, tmp_path / "b", _cfg(), evaluate_test=False, handlers=[SigtermAtStep(4)])
    snap = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert snap["precision"] == "bf16" and snap["global_step"] == 4 and snap["batch_in_epoch"] == 1
    run(data_dir, tmp_path / "b", _cfg(), evaluate_test=False, resume=True)
    a = load_file(Path(straight["model_dir"]) / "weights.safetensors")
    b = load_file(tmp_path / "b" / "model" / "weights.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    # bf16 really changed the arithmetic: the same recipe in fp32 ends elsewhere
    fp32 = run(data_dir, tmp_path / "c", _cfg(precision="fp32"), evaluate_test=False)
    c = load_file(Path(fp32["model_dir"]) / "weights.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_auto_precision_rules(monkeypatch):
    import medpipe.train.factories as eng
    from medpipe.errors import ConfigError
    from medpipe.models import create_model

    model = create_model("resnet18", 3)
    cpu = torch.device("cpu")
    assert eng.resolve_precision(_cfg(precision="bf16"), model, cpu) == ("bf16", "asked for")
    monkeypatch.setattr(eng, "cpu_bf16_flags", lambda *a: [])
    p, why = eng.resolve_precision(_cfg(precision="auto", deterministic=False), model, cpu)
    assert p == "fp32" and "no bf16 instructions" in why
    monkeypatch.setattr(eng, "cpu_bf16_flags", lambda *a: ["amx_bf16"])
    p, why = eng.resolve_precision(_cfg(precision="auto"), model, cpu)
    assert p == "fp32" and "--deterministic" in why
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(eng, "_PRECISION_CHECKS", {})
    rng = torch.get_rng_state()
    p, why = eng.resolve_precision(_cfg(precision="auto", deterministic=False), model, cpu)
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is untouched
    assert eng.resolve_precision(_cfg(precision="auto", deterministic=False), model, cpu) == (p, why)  # once
    assert p in ("bf16", "fp32") and "start-up check" in why and "ms in bf16" in why
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # checked on a copy
    with pytest.raises(ConfigError, match="precision"):
        _cfg(precision="fp16")
