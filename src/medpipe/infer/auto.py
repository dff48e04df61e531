"""``--backend auto``: which runtime to run a package on, on this machine, and starting it.

:func:`choose_auto` is a pure function of the machine (:class:`Host`: device, ONNX Runtime, the CPU's
INT8 instructions and model, what OpenVINO runs here) and of what the package records about its INT8
model (``int8.json``: the accuracy gates and the speed figures timed at quantize time), so it is
tested without loading any runtime. :func:`auto_backend` gathers those facts (probing the machine,
verifying the INT8 record, timing INT8 here once per process where the package has no figure for this
CPU model); :func:`open_backend` starts the backend chosen or asked for, and falls back where it must.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from medpipe.errors import MedpipeError
from medpipe.infer import openvino_runtime as ovr
from medpipe.infer import quantize as q
from medpipe.infer.backends import Backend, LoadContext, backend_class, check_name, definition

if TYPE_CHECKING:  # annotations only
    import torch

    from medpipe.package import PackageMeta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Host:
    """What ``auto`` needs to know about this machine (:meth:`probe` finds out)."""

    device: str = "cpu"  # torch device type
    onnxruntime: bool = True  # ONNX Runtime installed
    int8_flags: tuple[str, ...] = ()  # INT8 dot-product instructions (VNNI, AMX)
    cpu_model: str = "unknown"
    openvino: str | None = None  # the OpenVINO version installed here; None: not installed
    openvino_precisions: tuple[str, ...] = ()  # inference precisions OpenVINO runs on this CPU
    openvino_problem: str | None = None  # OpenVINO is installed but does not start

    @classmethod
    def probe(cls, device_type: str, *, openvino: bool = False) -> "Host":
        """This machine; ``openvino``: also ask OpenVINO what it runs (it starts OpenVINO's runtime)."""
        facts: dict[str, Any] = {"device": device_type,
                                 "onnxruntime": importlib.util.find_spec("onnxruntime") is not None}
        if device_type == "cpu":
            facts.update(int8_flags=tuple(q.cpu_int8_flags()), cpu_model=q.cpu_model())
        if openvino and ovr.available():
            try:
                facts.update(openvino=ovr.version(),
                             openvino_precisions=tuple(p for p in ovr.PRECISIONS if ovr.supported(p)))
            except Exception as exc:  # noqa: BLE001 - a broken optional runtime is a reason not to use it
                facts.update(openvino="unknown", openvino_problem=f"{exc.__class__.__name__}: {exc}")
        return cls(**facts)


def openvino_usable(info: dict, host: Host) -> tuple[dict | None, str]:
    """The INT8 record's ``openvino`` entry if it can be used on ``host`` at all (installed, well-formed,
    same OpenVINO release line as gated, precision runnable on this CPU), else None and why. Whether its
    gate passed is :func:`openvino_verdict`'s question."""
    rec = info.get("openvino")
    if not isinstance(rec, dict) or not isinstance(rec.get("gate"), dict):
        return None, ("its INT8 model has no OpenVINO gate (it was quantized without OpenVINO installed; "
                      "run 'medpipe quantize' again with pip install 'medpipe-imaging[openvino]', or use --backend int8)")
    if host.openvino is None:
        return None, "OpenVINO is not installed (pip install 'medpipe-imaging[openvino]')"
    t, g = rec.get("temperature"), rec["gate"]
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0 or rec.get("precision") not in ovr.PRECISIONS \
            or not isinstance(g.get("passed"), bool) or not all(isinstance(g.get(k), (int, float))
                                                                 for k in ("agreement", "auc_diff")):
        return None, (f"{q.INT8_META}: its 'openvino' record is malformed (temperature, precision or gate figures); "
                      "run 'medpipe quantize' again")
    if host.openvino_problem:
        return None, f"OpenVINO does not start here ({host.openvino_problem})"
    if ovr.release(host.openvino) != ovr.release(str(rec.get("version", ""))):
        return None, (f"its OpenVINO gate was run with OpenVINO {rec.get('version')}, this is {host.openvino}: "
                      "outputs of another release were never gated; run 'medpipe quantize' again")
    if rec["precision"] not in host.openvino_precisions:
        return None, (f"its OpenVINO gate was run in {rec['precision']}, which this CPU does not run; run "
                      "'medpipe quantize' again on this machine or use --backend int8")
    return rec, "usable"


def openvino_verdict(info: dict, host: Host) -> tuple[bool, str]:
    """Whether the ``openvino`` backend may run this INT8 model on ``host``, and why:
    :func:`openvino_usable` and its own gate, run at quantize time, passed."""
    rec, why = openvino_usable(info, host)
    if rec is None:
        return False, why
    g = rec["gate"]
    if not g["passed"]:
        return False, "OpenVINO's outputs failed the accuracy gate: " + "; ".join(map(str, g.get("failures", [])))
    return True, (f"OpenVINO gate passed in {rec['precision']} (agreement {g['agreement']:.1%}, macro AUC "
                  f"difference {g['auc_diff']:.4f})")


@dataclass(frozen=True)
class SpeedCheck:
    """The outcome of auto's start-up timing of FP32 against INT8 (``speed``: :func:`quantize.measure_speedup`'s
    result), run only where the package has no figure for this CPU model."""

    speed: dict | None = None
    error: str | None = None  # the check itself failed
    openvino_error: str | None = None  # OpenVINO failed during the check (ONNX Runtime's INT8 was timed alone)


def recorded_speed(info: dict, host: Host) -> dict | None:
    """The speed figure the INT8 record holds for this CPU model, if any."""
    speed = info.get("speed") if isinstance(info.get("speed"), dict) else None
    if (speed is not None and isinstance(speed.get("cpu"), dict) and speed["cpu"].get("model") == host.cpu_model
            and isinstance(speed.get("speedup"), (int, float)) and math.isfinite(speed["speedup"])):
        return speed
    return None


def needs_speed_check(host: Host, info: dict | None) -> bool:
    """Whether ``auto`` must time INT8 here before choosing: a usable, gated INT8 model on an INT8-capable
    CPU with no speed figure for this CPU model."""
    return (host.device == "cpu" and host.onnxruntime and bool(host.int8_flags) and info is not None
            and bool(info["gate"].get("passed")) and recorded_speed(info, host) is None)


def choose_auto(host: Host, info: dict | None = None, *, no_int8: str | None = None,
                check: SpeedCheck | None = None, package: bool = True) -> tuple[str, str]:
    """``auto``'s backend and why, from the machine and the package's verified INT8 record ``info``
    (None: the package has none, or it is unusable for the reason ``no_int8``; ``package`` False: no
    package to look at). On a CUDA device CUDA graphs; on another non-CPU device eager; on CPU the
    gated INT8 model (OpenVINO where its own gate passed and it measured faster than ONNX Runtime's INT8)
    where the CPU has VNNI/AMX and INT8 measured at least ``MIN_SPEEDUP`` x FP32 ONNX on this CPU model
    (the figure recorded at quantize time, else ``check``), else ONNX Runtime FP32 when installed,
    else eager (each the fastest measured in benchmarks/serve_load.py)."""
    if host.device == "cuda":
        return "cudagraph", "auto on a CUDA device"
    if host.device != "cpu":
        return "eager", f"auto on {host.device}"
    if not host.onnxruntime:
        return "eager", "auto: onnxruntime is not installed"
    if not package:
        return "onnx", "auto: ONNX Runtime FP32"
    chosen, why = _choose_quantized(host, info, no_int8, check)
    if chosen:
        return chosen, f"auto: {why}"
    return "onnx", f"auto: ONNX Runtime FP32, not INT8 because {why}"


def _choose_quantized(host: Host, info: dict | None, no_int8: str | None,
                      check: SpeedCheck | None) -> tuple[str | None, str]:
    flags = "+".join(host.int8_flags)
    if not host.int8_flags:
        return None, "this CPU reports no INT8 dot-product instructions (avx512_vnni, avx_vnni or amx_int8)"
    if info is None:
        return None, no_int8 or f"the package has no INT8 model (medpipe quantize makes one); CPU has {flags}"
    g = info["gate"]
    if not g.get("passed"):
        return None, ("its INT8 model failed the accuracy gate (written with --force): "
                      + "; ".join(g.get("failures", [])))
    gated = f"gated INT8 model (agreement {g['agreement']:.1%}, macro AUC difference {g['auc_diff']:.4f})"
    ov_ok, ov_why = openvino_verdict(info, host)
    speed = recorded_speed(info, host)
    if speed is not None:
        source = f"measured at quantize time on this CPU model ({host.cpu_model}, {flags})"
    elif check is None:
        return None, f"its {gated} has no speed figure for this CPU ({host.cpu_model}) and no start-up check could run"
    elif check.error or check.speed is None:
        return None, f"the start-up speed check of its {gated} failed ({check.error})"
    else:
        speed = check.speed
        if check.openvino_error:
            ov_ok, ov_why = False, f"OpenVINO failed its start-up check ({check.openvino_error})"
        before = info.get("speed")
        source = (f"start-up check on this CPU ({host.cpu_model}, {flags}; "
                  + ("the quantize-time figure is from " + str(before["cpu"].get("model"))
                     if isinstance(before, dict) and isinstance(before.get("cpu"), dict)
                     else "no quantize-time figure") + ")")
    ovs = speed.get("openvino_speedup")
    if (ov_ok and isinstance(ovs, (int, float)) and math.isfinite(ovs) and ovs >= q.MIN_SPEEDUP
            and ovs > speed["speedup"]):
        return "openvino", f"{gated}, {ov_why}, {q.format_speed(speed)} {source}"
    if speed["speedup"] >= q.MIN_SPEEDUP:
        not_ov = (ov_why if not ov_ok else "no OpenVINO speed figure" if not isinstance(ovs, (int, float))
                  else f"OpenVINO measured {ovs:.2f}x FP32 ONNX")
        return "int8", f"{gated}, {q.format_speed(speed)} {source}; not OpenVINO: {not_ov}"
    return None, (f"its {gated} is not fast enough here: {q.format_speed(speed)} {source}, "
                  f"at least {q.MIN_SPEEDUP}x required")


_SPEED_CHECKS: dict[tuple, SpeedCheck] = {}  # start-up checks, once per process, INT8 model, CPU and thread count


def auto_backend(device_type: str, meta: "PackageMeta | None" = None, fp32: Callable[[], bytes] | None = None,
                 threads: int | None = None) -> tuple[str, str]:
    """``auto`` on this machine for this package: probe, read and verify the INT8 record, time INT8 here
    if the package has no figure for this CPU model (``fp32``: returns the FP32 ONNX bytes; without it no
    check, no INT8; cached for the process), then :func:`choose_auto`."""
    if device_type != "cpu" or meta is None or importlib.util.find_spec("onnxruntime") is None:
        return choose_auto(Host.probe(device_type), package=meta is not None)
    info, int8, no_int8 = None, None, None
    host = Host.probe(device_type)
    if host.int8_flags:
        if not q.int8_paths(meta.dir)[1].is_file():
            no_int8 = f"the package has no INT8 model (medpipe quantize makes one); CPU has {'+'.join(host.int8_flags)}"
        else:
            try:
                int8, info = q.load_int8(meta)
            except MedpipeError as exc:
                no_int8 = f"its INT8 model is not usable: {exc}"
    if info is not None and isinstance(info.get("openvino"), dict):
        host = Host.probe(device_type, openvino=True)
    check = None
    if needs_speed_check(host, info) and fp32 is not None:
        ov_ok = openvino_verdict(info, host)[0]
        key = (info["sha256"], host.cpu_model, threads, ov_ok)
        check = _SPEED_CHECKS.get(key) or _speed_check(fp32, int8, meta.preprocessing.image_size, threads,
                                                       info["openvino"]["precision"] if ov_ok else None)
        if not check.error:  # a failed check is tried again by the next predictor
            _SPEED_CHECKS[key] = check
    return choose_auto(host, info, no_int8=no_int8, check=check)


def _speed_check(fp32, int8: bytes, size: int, threads: int | None, openvino: str | None) -> SpeedCheck:
    """Time FP32 against INT8 (and OpenVINO's INT8 where its gate passed; should OpenVINO fail here, ONNX
    Runtime's INT8 alone). A failed check is a reason to keep FP32, not to fail."""
    ov_error = None
    if openvino:
        try:
            return SpeedCheck(q.measure_speedup(fp32(), int8, size, threads=threads, warmup=1, rounds=3,
                                                openvino=openvino))
        except Exception as exc:  # noqa: BLE001
            ov_error = f"{exc.__class__.__name__}: {exc}"
    try:
        return SpeedCheck(q.measure_speedup(fp32(), int8, size, threads=threads, warmup=1, rounds=3),
                          openvino_error=ov_error)
    except Exception as exc:  # noqa: BLE001
        return SpeedCheck(error=f"{exc.__class__.__name__}: {exc}", openvino_error=ov_error)


def resolve_backend(backend: str, device: "torch.device", meta: "PackageMeta | None" = None,
                    fp32: Callable[[], bytes] | None = None, threads: int | None = None) -> tuple[str, str]:
    """The backend to run and why: ``backend`` itself when asked for (checked against the device), else
    :func:`auto_backend`'s choice."""
    check_name(backend, device.type)
    if backend != "auto":
        return backend, "asked for"
    return auto_backend(device.type, meta, fp32, threads)


def open_backend(backend: str, ctx: LoadContext) -> tuple[Backend, str, str]:
    """Resolve ``backend`` and start it: (the running backend, its name, why). A backend asked for that
    cannot start is an error naming the next choice; one ``auto`` chose falls back to eager."""
    name, reason = resolve_backend(backend, ctx.device, ctx.meta, ctx.fp32_onnx, ctx.threads)
    try:
        return backend_class(name).load(ctx), name, reason
    except (RuntimeError, MedpipeError) as exc:
        if backend != "auto":
            raise MedpipeError(f"the {name} backend could not start ({exc}); --backend {definition(name).next_choice} "
                               "is the next choice") from None
        log.warning("the %s backend could not start (%s); using the eager backend", name, exc)
        return (backend_class("eager").load(ctx), "eager",
                f"auto: fell back because the faster backend could not start ({exc})")
