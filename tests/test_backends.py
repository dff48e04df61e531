"""Backends behind one interface: ``auto``'s choice as a pure function of the machine and the package's
recorded gates and timings (no runtime loaded), and a backend registered from a test module that the
Predictor runs without any change to it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medpipe.errors import MedpipeError
from medpipe.infer.auto import Host, SpeedCheck, choose_auto, needs_speed_check

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tests" / "data" / "densenet-test"
XEON = "Intel(R) Xeon(R) Platinum 8480+"
VNNI = Host(device="cpu", int8_flags=("avx512_vnni", "amx_int8"), cpu_model=XEON)


def _record(speedup=1.5, cpu=XEON, passed=True, openvino=None):
    """An int8.json record as medpipe quantize writes it (the fields auto reads)."""
    rec = {"sha256": "a" * 64, "temperature": 1.1,
           "gate": {"passed": passed, "agreement": 0.995, "auc_diff": 0.001,
                    "failures": [] if passed else ["top-1 agreement with FP32 is 90.0%"]}}
    if speedup is not None:
        rec["speed"] = {"speedup": speedup, "cpu": {"model": cpu},
                        "batches": {"1": {"fp32_ms": 10.0 * speedup, "int8_ms": 10.0, "speedup": speedup}}}
    if openvino is not None:
        ovs, version = openvino
        rec["openvino"] = {"version": version, "precision": "f32", "temperature": 1.2,
                           "gate": {"passed": True, "agreement": 0.99, "auc_diff": 0.002, "failures": []}}
        rec["speed"]["openvino_speedup"] = ovs
        rec["speed"]["batches"]["1"].update(openvino_ms=10.0 * speedup / ovs, openvino_speedup=ovs)
    return rec


@pytest.mark.parametrize("host, record, kw, want, says", [
    (Host(device="cuda"), None, {}, "cudagraph", "auto on a CUDA device"),
    (Host(device="mps"), None, {}, "eager", "auto on mps"),
    (Host(onnxruntime=False, int8_flags=("avx512_vnni",)), _record(), {}, "eager", "onnxruntime is not installed"),
    (VNNI, None, {"package": False}, "onnx", "auto: ONNX Runtime FP32"),
    (Host(cpu_model=XEON), _record(), {}, "onnx", "no INT8 dot-product instructions"),
    (VNNI, None, {"no_int8": "its INT8 model is not usable: sha256 mismatch"}, "onnx", "sha256 mismatch"),
    (VNNI, _record(passed=False), {}, "onnx", "failed the accuracy gate (written with --force)"),
    (VNNI, _record(1.3), {}, "int8", "INT8 1.30x FP32 ONNX"),
    (VNNI, _record(1.05), {}, "onnx", "at least 1.1x required"),
    (VNNI, _record(3.0, cpu="Other CPU"), {}, "onnx", "no speed figure for this CPU"),
    (VNNI, _record(3.0, cpu="Other CPU"), {"check": SpeedCheck({"speedup": 1.4, "batches": {}})}, "int8",
     "start-up check on this CPU"),
    (VNNI, _record(None), {"check": SpeedCheck(error="RuntimeError: boom")}, "onnx", "speed check of its gated"),
    (Host(**{**VNNI.__dict__, "openvino": "2026.4.0", "openvino_precisions": ("f32",)}),
     _record(1.5, openvino=(2.5, "2026.4.1")), {}, "openvino", "OpenVINO gate passed in f32"),
    (Host(**{**VNNI.__dict__, "openvino": "2026.4.0", "openvino_precisions": ("f32",)}),
     _record(1.5, openvino=(1.2, "2026.4.1")), {}, "int8", "not OpenVINO: OpenVINO measured 1.20x"),
    (Host(**{**VNNI.__dict__, "openvino": "2025.1.0", "openvino_precisions": ("f32",)}),
     _record(1.5, openvino=(2.5, "2026.4.1")), {}, "int8", "outputs of another release were never gated"),
    (VNNI, _record(1.5, openvino=(2.5, "2026.4.1")), {}, "int8", "OpenVINO is not installed"),
])
def test_auto_is_a_function_of_the_machine_and_the_recorded_figures(host, record, kw, want, says):
    chosen, why = choose_auto(host, record, **kw)
    assert chosen == want and says in why, why


def test_a_speed_check_is_needed_only_without_a_figure_for_this_cpu():
    assert not needs_speed_check(VNNI, _record(1.5))
    assert needs_speed_check(VNNI, _record(1.5, cpu="Other CPU")) and needs_speed_check(VNNI, _record(None))
    assert not needs_speed_check(VNNI, _record(None, passed=False)) and not needs_speed_check(VNNI, None)
    assert not needs_speed_check(Host(cpu_model=XEON), _record(None))


def test_choosing_loads_no_runtime():
    code = ("import sys, json; from medpipe.infer.auto import Host, choose_auto; "
            "r = {'gate': {'passed': True, 'agreement': 1.0, 'auc_diff': 0.0}, "
            "'speed': {'speedup': 2.0, 'cpu': {'model': 'X'}, 'batches': {}}}; "
            "c = choose_auto(Host(int8_flags=('amx_int8',), cpu_model='X'), r); "
            "print(json.dumps([c[0], sorted(m for m in ('torch', 'onnxruntime', 'openvino') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["int8", []]


class DoubledEager:
    """A backend defined here, outside medpipe: the eager model run in float64."""

    name = "test-float64"
    record = None

    def __init__(self, model):
        self.model, self.calls = model, []

    @classmethod
    def load(cls, ctx):
        import copy

        return cls(copy.deepcopy(ctx.model).double())

    def run(self, x):
        self.calls.append(tuple(x.shape))
        return self.model(x.double()).float()

    def describe(self):
        return {"backend": self.name, "runtime": "torch float64"}

    def warm(self):
        pass


class Broken(DoubledEager):
    @classmethod
    def load(cls, ctx):
        raise RuntimeError("no such accelerator")


@pytest.fixture()
def registry():
    """medpipe.infer.backends, its registry put back as it was after the test."""
    from medpipe.infer import backends

    saved = dict(backends.REGISTRY)
    yield backends
    backends.REGISTRY.clear()
    backends.REGISTRY.update(saved)


def test_a_backend_registered_from_a_test_module_runs_in_the_predictor(registry):
    from medpipe.infer.backends import Backend
    from medpipe.infer.predictor import Predictor

    class Float64(DoubledEager, Backend):
        pass

    registry.register("test-float64", Float64)
    p = Predictor(PKG, device="cpu", backend="test-float64")
    eager = Predictor(PKG, device="cpu", backend="eager")
    pixels = [np.full((32, 32, 3), v, np.uint8) for v in (0, 120, 255)]
    assert p.backend == "test-float64" and p.backend_reason == "asked for" and p.runtime.calls == []
    assert np.allclose(p.probabilities(pixels), eager.probabilities(pixels), atol=1e-5)
    assert p.runtime.calls == [(3, 3, 32, 32)] and p.runtime.describe()["runtime"] == "torch float64"
    assert p.predict_bytes([_png(pixels[1])])[0].label in p.classes


def test_registered_backends_get_the_same_checks_and_fallbacks(registry):
    from medpipe.infer.predictor import Predictor

    registry.register("test-gpu-only", DoubledEager, device="cuda")
    with pytest.raises(MedpipeError, match="the test-gpu-only backend needs --device cuda"):
        Predictor(PKG, device="cpu", backend="test-gpu-only")
    registry.register("test-broken", Broken, next_choice="onnx")
    with pytest.raises(MedpipeError, match=r"the test-broken backend could not start \(no such accelerator\); "
                                           r"--backend onnx is the next choice"):
        Predictor(PKG, device="cpu", backend="test-broken")
    with pytest.raises(MedpipeError, match="unknown backend 'nope'; choose one of auto, eager, .*test-broken"):
        Predictor(PKG, device="cpu", backend="nope")
    with pytest.raises(ValueError, match="'auto' is the choice"):
        registry.register("auto", DoubledEager)


def _png(arr) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
