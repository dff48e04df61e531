"""Where `medpipe serve` spends its time under load: py-spy samples the server (and its decode workers)
while serve_load.py's clients drive it, and the samples are summed into a top-N table.

    pip install py-spy            # a profiling tool, not a medpipe dependency
    python benchmarks/serve_profile.py --py-spy .bench/profile          # profile + table (stdout, TABLE.md)
    python benchmarks/serve_profile.py --rounds 3 -- --decode-workers 1  # no profiler: req/s of a setting

The server is the one serve_load.py --int8-peer measures: the untrained 224 px DenseNet121 package with its
INT8 model (_common.int8_package: built once under .bench/int8_pkg224/, shared with serve_load.py),
``medpipe serve --backend openvino``; arguments after ``--`` go to ``medpipe serve`` (one setting at a time). Clients: --clients keep-alive connections sending
600x450 JPEGs, --requests in total. ``--py-spy DIR`` runs the server under ``py-spy record --idle --threads
--subprocesses --format raw`` and writes DIR/raw.txt (collapsed stacks) and DIR/TABLE.md: samples per
process and thread (and the cores they kept busy), then the top functions by own samples (innermost frame)
and by inclusive samples (any frame). A sample is 1/--rate s of a running thread (``--idle``: of any thread,
a waiting one counted at its waiting frame: where the wall clock goes). Without --py-spy each round reports req/s; rounds interleave with --compare.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, int8_package, synth_dataset  # noqa: E402
from serve_load import drive, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent


def server_cmd(pkg: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "medpipe", "serve", "--model", str(pkg), "--port", str(port),
            "--backend", "openvino", "--device", "cpu", *extra]


def run_once(pkg: Path, images: list[bytes], args, extra: list[str], spy: Path | None = None,
             src: Path = ROOT.parent / "src") -> dict:
    """One server (medpipe from ``src``), warmed up, then the load; with ``spy`` the load is sampled by py-spy."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(server_cmd(pkg, port, extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    recorder = None
    try:
        wait_ready(port, proc)
        drive(port, images, args.clients, 2 * args.clients, "/invocations")  # warm-up at the load's batch sizes
        if spy is not None:
            spy.mkdir(parents=True, exist_ok=True)
            spy_cmd = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                       str(proc.pid), "--format", "raw", "--output", str(spy / "raw.txt"), "--rate", str(args.rate),
                       "--threads", "--subprocesses", "--nonblocking"] + (["--idle"] if args.idle else [])
            recorder = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
            time.sleep(1.0)  # py-spy attaches
        before = batch_sizes(port)
        load = drive(port, images, args.clients, args.requests, "/invocations")
        load["load_average"] = os.getloadavg()
        after = batch_sizes(port)
        load["batches"] = {k: after[k] - before.get(k, 0) for k in after}
        return load
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, err = recorder.communicate(timeout=120)
            if recorder.returncode not in (0, None) and not (spy / "raw.txt").is_file():
                print(f"py-spy failed: {err.decode()[-400:]}")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def batch_sizes(port: int) -> dict[str, float]:
    """The server's medpipe_batch_size histogram: cumulative forward passes per bucket bound, "sum" (images)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    out = {}
    for line in c.getresponse().read().decode().splitlines():
        m = re.match(r'medpipe_batch_size_(bucket\{le="([^"]+)"\}|sum|count) ([0-9.e+]+)', line)
        if m:
            out[m.group(2) or m.group(1)] = float(m.group(3))
    return out


def batch_line(b: dict[str, float]) -> str:
    """Forward passes by batch size (from the cumulative histogram) and the mean batch."""
    bounds = sorted((float(k), v) for k, v in b.items() if k not in ("sum", "count") and k != "+Inf")
    parts, prev = [], 0.0
    for bound, cum in bounds:
        if cum - prev:
            parts.append(f"<={bound:g}: {cum - prev:.0f}")
        prev = cum
    mean = b.get("sum", 0) / b["count"] if b.get("count") else float("nan")
    return f"forwards by batch size {', '.join(parts)}; mean batch {mean:.1f}"


_LINE = re.compile(r'^process (\d+):"(.*?)";(thread \(\d+\)[^;]*);?(.*)$')
_FUNC = re.compile(r"^(.*) \((.*?):\d+\)$")


def _process_name(cmd: str) -> str:
    if "spawn_main" in cmd:
        return "decode worker"
    return "resource tracker" if "resource_tracker" in cmd else "server"


def _func(frame: str) -> str:
    m = _FUNC.match(frame)
    if not m:
        return frame
    name, path = m.groups()
    parts = Path(path).parts
    for anchor in ("site-packages", "medpipe", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + (anchor != "medpipe"):]
            break
    return f"{name} ({'/'.join(parts[-3:])})"


GROUPS = (  # (label, process, thread or "", a frame substring or ""): the first that matches a sample counts it
    ("forward: OpenVINO infer (its own worker threads are native, not sampled)", "server", "medpipe-infer", "InferRequest.infer"),
    ("forward thread: eval preset (MONAI scale + normalise)", "server", "medpipe-infer", "transforms/"),
    ("forward thread: the rest (softmax, stacking, hand-over)", "server", "medpipe-infer", ""),
    ("event loop: HTTP (uvicorn h11)", "server", "MainThread", "protocols/http"),
    ("event loop: everything else (uvloop, starlette, medpipe routes)", "server", "MainThread", ""),
    ("server: pebble's task/result/pool threads (pipe I/O, pickling)", "server", "", "pebble/"),
    ("decode worker: decoding (Pillow open, draft, resize)", "decode worker", "", "decode_item"),
    ("decode worker: sending the result (pipe write, pebble lock)", "decode worker", "", "Connection._send"),
    ("decode worker: waiting for/reading a task", "decode worker", "", ""),
)


def _group(proc: str, thread: str, stack: str) -> str:
    for label, p, t, frame in GROUPS:
        if p == proc and t in thread and frame in stack:
            return label
    return f"{proc}: {thread}: other"


def summarize(raw: Path, seconds: float, rate: int, top: int = 25) -> str:
    """raw.txt (``process ...;thread ...;frame;... count`` per line) -> markdown tables: samples per process and
    thread (as a share of all samples and as cores kept busy: samples / (rate * seconds)), then functions."""
    per_thread: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        m = _LINE.match(stack)
        if not m or not count.isdigit():
            continue
        n, proc = int(count), _process_name(m.group(2))
        thread = re.sub(r"\(\d+\)", "", m.group(3)).replace("thread", "").strip(" :") or "?"
        funcs = [_func(f) for f in m.group(4).split(";") if f]
        per_thread[f"{proc}: {thread}"] += n
        groups[_group(proc, thread, m.group(4))] += n
        total += n
        if funcs:
            own[f"{proc}: {funcs[-1]}"] += n
            for f in set(funcs):
                incl[f"{proc}: {f}"] += n
    if not total:
        return "no samples\n"
    busy = total / (rate * seconds)
    lines = [f"{total} samples in {seconds:.1f} s at {rate}/s: {busy:.2f} cores' worth of sampled threads\n",
             "| process: thread | samples | % | cores |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v} | {100 * v / total:.1f} | {v / (rate * seconds):.2f} |"
              for k, v in per_thread.most_common(top)]
    lines += ["", "| where the time goes | samples | % | cores |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v} | {100 * v / total:.1f} | {v / (rate * seconds):.2f} |" for k, v in groups.most_common()]
    for title, counter in (("own (innermost frame)", own), ("inclusive (any frame)", incl)):
        lines += ["", f"| top functions, {title} | samples | % |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {v} | {100 * v / total:.1f} |" for k, v in counter.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=1, help="load rounds per setting (a fresh server each)")
    ap.add_argument("--compare", default=None,
                    help="a second setting (medpipe serve arguments in one string): rounds alternate A, B, A, B")
    ap.add_argument("--compare-src", default=None,
                    help="a second medpipe source tree (its src/ folder, e.g. an older commit's `git archive`): "
                         "rounds alternate this tree and that one, same settings")
    ap.add_argument("--py-spy", dest="spy", default=None, help="folder: profile the load phase with py-spy")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second per thread")
    ap.add_argument("--idle", action="store_true", help="py-spy: sample idle threads too (default: running ones)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("serve_args", nargs="*", help="after --: medpipe serve arguments of the setting measured")
    args = ap.parse_args()
    pkg = int8_package(args.size)
    images = [p.read_bytes() for p in sorted(synth_dataset(200).rglob("*.jpg"))[:32]]
    if args.spy:
        spy = Path(args.spy)
        row = run_once(pkg, images, args, args.serve_args, spy)
        table = summarize(spy / "raw.txt", row["seconds"], args.rate, args.top)
        head = (f"`medpipe serve --backend openvino {' '.join(args.serve_args)}`, {args.clients} clients, "
                f"{args.requests} requests: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.0f} ms "
                f"(load average {row['load_average'][0]:.2f}, {os.cpu_count()} cores); {batch_line(row['batches'])}\n\n")
        (spy / "TABLE.md").write_text(head + table)
        print(head + table)
        return
    src = ROOT.parent / "src"
    settings = {"A": (args.serve_args, src)} | ({"B": (args.compare.split(), src)} if args.compare else {}) | (
        {"B": (args.serve_args, Path(args.compare_src).resolve())} if args.compare_src else {})
    results: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(args.rounds):
        for key, (extra, tree) in settings.items():
            row = run_once(pkg, images, args, extra, src=tree)
            results[key].append(row["rps"])
            print(f"round {r + 1} {key} {tree} {' '.join(extra) or '(defaults)'}: {row['rps']:.1f} req/s  "
                  f"p50 {row['p50_ms']:.0f} ms  p95 {row['p95_ms']:.0f} ms  errors {row['errors']}  "
                  f"load {row['load_average'][0]:.2f}  {batch_line(row['batches'])}", flush=True)
    for key, xs in results.items():
        print(f"{key}: best {max(xs):.1f}  median {sorted(xs)[len(xs) // 2]:.1f} req/s  "
              f"({settings[key][1]} {' '.join(settings[key][0])})")


if __name__ == "__main__":
    main()
