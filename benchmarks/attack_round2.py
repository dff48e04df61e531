"""The second review's fairness cases for `python benchmarks/attack.py --round2` (described there):
slow uploaders, a connection flood, BYTES floods, and a legitimate client measured while they run."""

from __future__ import annotations

import collections
import http.client
import io
import json
import multiprocessing
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, write_result  # noqa: E402
from serve_load import make_package, pct, wait_ready  # noqa: E402

LEGIT_SOURCE = "127.0.0.1"
OK_WITHIN_S = 2.0


def _status(reply: bytes) -> str:
    m = re.match(rb"HTTP/1\.1 (\d+)", reply)
    if not m:
        return "closed" if not reply else "junk"
    err = re.search(rb'"error": ?"([a-z_]+)"', reply)
    return m.group(1).decode() + (f" {err.group(1).decode()}" if err else "")


class Paced:
    """One request every ``every_s`` on its own thread (so a slow answer does not delay the next one)."""

    def __init__(self, port: int, make, every_s: float = 0.1):
        self.port, self.make, self.every_s = port, make, every_s
        self.results: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def one(self) -> None:
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(LEGIT_SOURCE, 0))
        try:
            method, path, body, headers = self.make()
            conn.request(method, path, body, headers)
            r = conn.getresponse()
            r.read()
            st = str(r.status)
        except OSError as exc:
            st = exc.__class__.__name__
        finally:
            conn.close()
        with self.lock:
            self.results.append((st, time.perf_counter() - t))

    def run(self, seconds: float) -> None:
        with ThreadPoolExecutor(64) as ex:
            t0 = time.perf_counter()
            for k in range(int(seconds / self.every_s)):
                time.sleep(max(0.0, t0 + k * self.every_s - time.perf_counter()))
                ex.submit(self.one)


def slow_uploaders(port: int, count: int, stop: threading.Event, answers: collections.Counter) -> None:
    """``count`` connections, 8 per address from 127.0.0.2 up, each declaring a 100 kB body and sending
    1 byte a second; a connection that is answered or closed is replaced."""
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    socks: dict[int, socket.socket] = {}
    while not stop.is_set():
        for i in range(count):
            if i not in socks:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5,
                                                 source_address=(f"127.0.0.{2 + i // 8}", 0))
                    s.sendall(head)
                    s.setblocking(False)
                    socks[i] = s
                except OSError as exc:
                    answers[exc.__class__.__name__] += 1
        stop.wait(1.0)
        for i, s in list(socks.items()):
            try:
                s.send(b"\xff")
                answers[_status(s.recv(65536))] += 1
            except BlockingIOError:
                continue
            except OSError as exc:
                answers[exc.__class__.__name__] += 1
            s.close()
            del socks[i]
    for s in socks.values():
        s.close()


def _flood_process(port: int, index: int, spread: int, ask: bool, stop, counter) -> None:
    """Open connections as fast as possible from ``spread`` addresses 127.0.1.<index * spread + k>, send
    nothing (or, with ``ask``, one GET /ping and then nothing: an idle keep-alive connection), keep the
    newest 200."""
    held: collections.deque = collections.deque()
    n = 0
    while not stop.is_set():
        try:
            s = socket.socket()
            s.bind((f"127.0.1.{index * spread + n % spread + 1}", 0))
            s.connect(("127.0.0.1", port))
            if ask:
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(s)
            n += 1
            if n % 100 == 0:
                with counter.get_lock():
                    counter.value += 100
        except OSError:
            s.close()
            time.sleep(0.001)
        while len(held) > 200:
            held.popleft().close()
    for s in held:
        s.close()


def bytes_flooder(port: int, model: str, stop: threading.Event, answers: collections.Counter) -> None:
    body = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1_500_000],
                                   "data": [""] * 1_500_000}]}, separators=(",", ":")).encode()
    while not stop.is_set():
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=("127.0.2.1", 0))
            c.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            answers[f"{r.status}"] += 1
            r.read()
            c.close()
        except OSError as exc:
            answers[exc.__class__.__name__] += 1
            time.sleep(0.05)


def counters(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    wanted = ("medpipe_connections_closed_total", "medpipe_uploads_refused_total", "medpipe_rejected_total")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(wanted)}


def run_case(name: str, port: int, args, jpeg: bytes, model: str) -> dict:
    """One case: its attackers start, the legitimate client and /ping are measured, the attackers stop."""
    stop, answers = threading.Event(), collections.Counter()
    threads, procs = [], []
    mp_stop, flood_count = multiprocessing.Event(), multiprocessing.Value("l", 0)
    if name in ("slow_upload", "combined", "combined_keepalive"):
        threads.append(threading.Thread(target=slow_uploaders, args=(port, args.uploaders, stop, answers)))
    if name.startswith(("flood", "combined")):
        spread, ask = (8 if name == "flood_spread" else 1), name.endswith("keepalive")
        procs = [multiprocessing.Process(target=_flood_process, args=(port, i, spread, ask, mp_stop, flood_count))
                 for i in range(args.flood_procs)]
    if name == "bytes_flood":
        threads += [threading.Thread(target=bytes_flooder, args=(port, model, stop, answers))
                    for _ in range(args.bytes_clients)]
    before = counters(port)
    for t in threads + procs:
        t.start()
    time.sleep(2.0)  # the attack is under way
    legit = Paced(port, lambda: ("POST", "/invocations", jpeg, {"Content-Type": "image/jpeg"}))
    ping = Paced(port, lambda: ("GET", "/ping", None, {}))
    flood_at = (time.perf_counter(), flood_count.value)
    measured = [threading.Thread(target=p.run, args=(args.case_seconds,)) for p in (legit, ping)]
    for t in measured:
        t.start()
    for t in measured:
        t.join()
    flood_rate = (flood_count.value - flood_at[1]) / (time.perf_counter() - flood_at[0])
    stop.set()
    mp_stop.set()
    for t in threads + procs:
        t.join(60)
    time.sleep(1.0)
    after = counters(port)
    ok = [s for st, s in legit.results if st == "200" and s <= OK_WITHIN_S]
    return {
        "legit_requests": len(legit.results),
        "legit_ok_within_2s": round(len(ok) / max(1, len(legit.results)), 4),
        "legit_p50_ms": round(pct([s for _, s in legit.results], 50) * 1000, 1),
        "legit_p99_ms": round(pct([s for _, s in legit.results], 99) * 1000, 1),
        "legit_statuses": dict(collections.Counter(st for st, _ in legit.results)),
        "legit_latency_s": {f"<{b:g}": sum(s < b for _, s in legit.results) for b in (0.25, 0.5, 1, 2, 4, 10)},
        "ping_requests": len(ping.results),
        "ping_ok": sum(st == "200" for st, _ in ping.results),
        "ping_p99_ms": round(pct([s if st == "200" else 10.0 for st, s in ping.results], 99) * 1000, 1),
        "flood_connections_per_s": round(flood_rate) if procs else None,
        "attacker_answers": dict(answers),
        "server_counters": {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)},
    }


def round2(args) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = make_package(Path(tmp) / "pkg", args.size)
        port = free_port()
        log = Path(tmp) / "server.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "medpipe", "serve", "--model", str(pkg), "--port",
                                     str(port), "--backend", args.backend], stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, proc)
            for name in args.cases.split(","):
                results[name] = run_case(name, port, args, buf.getvalue(), "bench-densenet121")
                r = results[name]
                print(f"{name:12s} legit {r['legit_requests']} req, {100 * r['legit_ok_within_2s']:.1f}% 200 within "
                      f"2 s, p50 {r['legit_p50_ms']} ms, p99 {r['legit_p99_ms']} ms; /ping p99 {r['ping_p99_ms']} ms"
                      + (f"; flood {r['flood_connections_per_s']} conn/s" if r["flood_connections_per_s"] else ""),
                      flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        traceback = "Traceback" in log.read_text(errors="replace")
    met = {name: r["legit_ok_within_2s"] >= 0.95 and r["ping_p99_ms"] <= 500 for name, r in results.items()}
    result = {"args": vars(args), "cases": results, "traceback_in_log": traceback,
              "target": "combined cases: >= 95% of legitimate requests 200 within 2 s, /ping p99 <= 500 ms",
              "target_met": met}
    print(f"target (>= 95% 200 within 2 s, /ping p99 <= 500 ms) met: {met}; traceback in log: {traceback}")
    print(f"wrote {write_result('attack_round2', result)}")
