"""bf16 training on CPU: a bf16 run trains, records its precision, and resumes exactly; the rules of
``--precision auto``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw):
    from medpipe.config import make_config

    return make_config({"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 3,
                        "bootstrap": 0, "threads": 1, "workers": 0, "deterministic": True, "warmup_epochs": 0.5,
                        "precision": "bf16", **kw})


def _bf16_runs(data_dir: str, out: str) -> None:
    """The runs of the test below, in its child process: bf16 straight (a), bf16 stopped by SIGTERM after step 4
    (b, its checkpoint's fields written to interrupted.json) then resumed, and the same recipe in fp32 (c)."""
    from medpipe.pipeline import run
    from medpipe.train.checkpoint import load_checkpoint
    from medpipe.train.engine import TrainingInterrupted
    from tests.faults import SigtermAtStep

    data, out = Path(data_dir), Path(out)
    run(data, out / "a", _cfg(), evaluate_test=False)
    try:
        run(data, out / "b", _cfg(), evaluate_test=False, handlers=[SigtermAtStep(4)])
    except TrainingInterrupted:  # stopped mid-epoch 2: the checkpoint is a bf16 run's
        snap = load_checkpoint(out / "b" / "checkpoints" / "last.pt")
        fields = {k: snap[k] for k in ("precision", "global_step", "batch_in_epoch")}
        (out / "interrupted.json").write_text(json.dumps(fields))
    else:
        raise SystemExit("the SIGTERM after step 4 did not stop run b")
    run(data, out / "b", _cfg(), evaluate_test=False, resume=True)
    run(data, out / "c", _cfg(precision="fp32"), evaluate_test=False)


def test_bf16_run_resumes_exactly_from_a_bf16_checkpoint(data_dir, tmp_path):
    """The training runs (bf16 CPU kernels, a SIGTERM the process sends itself) go in a child process: a native
    crash there fails this test with the child's traceback instead of killing the whole pytest process."""
    from safetensors.torch import load_file

    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    code = f"from tests.test_precision import _bf16_runs; _bf16_runs({str(data_dir)!r}, {str(tmp_path)!r})"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path}, timeout=600)
    how = signal.Signals(-r.returncode).name if r.returncode < 0 else f"exit status {r.returncode}"
    assert r.returncode == 0, f"the bf16 runs' process ended with {how}:\n{r.stderr[-4000:]}"
    assert "SIGTERM received" in r.stderr
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["precision"] for m in lines] == ["bf16", "bf16"] and all(torch.isfinite(torch.tensor(m["train_loss"]))
                                                                        for m in lines)
    snap = json.loads((tmp_path / "interrupted.json").read_text())
    assert snap == {"precision": "bf16", "global_step": 4, "batch_in_epoch": 1}
    a = load_file(tmp_path / "a" / "model" / "weights.safetensors")
    b = load_file(tmp_path / "b" / "model" / "weights.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    # bf16 really changed the arithmetic: the same recipe in fp32 ends elsewhere
    c = load_file(tmp_path / "c" / "model" / "weights.safetensors")
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
