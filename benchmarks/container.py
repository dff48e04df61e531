"""The container image against the bare process: the same server, the same package, the same load.

    python benchmarks/container.py [--clients 8] [--requests 320] [--lone 20] [--size 224] [--backend onnx] [--rounds 1]

Builds the image as the tests do (tests/container_image.py: podman with runc, the host network, a local
Debian bookworm base), then for each round runs the load of benchmarks/serve_load.py (its ``measure``:
one lone client, then --clients concurrent clients sending synthetic 600x450 dermatoscopy JPEGs over
keep-alive connections to /invocations, /ping timed alongside) against ``medpipe serve`` as a bare
process and against ``IMAGE serve`` (read-only root filesystem, /tmp a tmpfs, the package mounted at
/opt/ml/model), both on loopback with the same backend and the package of serve_load.py (an untrained
DenseNet121 at --size). Also recorded: the image size and the cold start, from the start command to the
first /ping 200, of both. Results: benchmarks/results/container.json. The figures come from the rounds
run, on whatever else the machine was doing at the time (the result says the load average).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import write_result  # noqa: E402
from serve_load import make_package, measure, synth_dataset, wait_ready  # noqa: E402

import container_image as ci  # noqa: E402

READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"]


def bare_cmd(pkg: Path, port: int, backend: str) -> list[str]:
    return [sys.executable, "-m", "medpipe", "serve", "--model", str(pkg), "--port", str(port), "--backend", backend]


def container_cmd(pkg: Path, port: int, backend: str, name: str) -> list[str]:
    return [*ci.PODMAN, "run", "--rm", "--name", name, *ci.RUN_FLAGS, *READ_ONLY, "-e",
            f"SAGEMAKER_BIND_TO_PORT={port}", "-v", f"{pkg}:/opt/ml/model:ro", ci.IMAGE, "serve", "--backend", backend]


def cold_start(cmd: list[str], port: int, env: dict) -> float:
    """Seconds from starting ``cmd`` to its first /ping 200; the process is stopped (SIGTERM) afterwards."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(port, proc)
        return time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--lone", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--rounds", type=int, default=1, help="bare then container, this many times")
    args = ap.parse_args()
    reason = ci.unavailable()
    if reason:
        raise SystemExit(f"containers cannot run here: {reason}")
    t = time.perf_counter()
    ci.build()
    build_s = time.perf_counter() - t
    size = ci.image_size()
    print(f"image {ci.IMAGE}: {size / 1e6:.0f} MB (build or cache check {build_s:.0f} s)", flush=True)
    images = [p.read_bytes() for p in sorted(synth_dataset(200).rglob("*.jpg"))[:32]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"),
                                                                   os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="medpipe-bench-container-") as tmp:
        pkg = make_package(Path(tmp) / "pkg", args.size)
        os.chmod(tmp, 0o755)
        rows, starts = [], {"bare": [], "container": []}
        for r in range(args.rounds):
            port = ci.free_port()
            starts["bare"].append(cold_start(bare_cmd(pkg, port, args.backend), port, env))
            port = ci.free_port()
            name = f"medpipe-bench-{os.getpid()}-{r}"
            starts["container"].append(cold_start(container_cmd(pkg, port, args.backend, name), port, env))
            print(f"cold start to /ping 200: bare {starts['bare'][-1]:.1f} s, container {starts['container'][-1]:.1f} s",
                  flush=True)
            port = ci.free_port()
            rows.append(measure(f"bare-{args.backend}", bare_cmd(pkg, port, args.backend), port, images, args, env=env))
            port = ci.free_port()
            rows.append(measure(f"container-{args.backend}", container_cmd(pkg, port, args.backend, name), port,
                                images, args, env=env))
    bare = [x["rps"] for x in rows if x["name"].startswith("bare")]
    boxed = [x["rps"] for x in rows if x["name"].startswith("container")]
    ratio = sum(boxed) / sum(bare)
    print(f"container / bare throughput: {ratio:.3f} (target >= 0.95)")
    path = write_result("container", {
        "command": "python " + " ".join(["benchmarks/container.py", *sys.argv[1:]]),
        "what": "the image against the bare process: serve_load.py's load, cold start to the first /ping 200, "
                "image size",
        "settings": vars(args), "image": ci.IMAGE, "image_size_mb": round(size / 1e6), "build_or_cache_check_s":
        round(build_s), "cold_start_s": starts, "rows": rows, "throughput_ratio_container_over_bare": ratio,
        "load_average_at_end": os.getloadavg(),
        "note": "one run on a shared 2-core machine while other jobs ran (load average above); bare and container "
                "alternate within each round so both meet similar load; podman with runc and the host network"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
