"""Hostile clients against the real `medpipe serve` process on loopback (RELIABILITY.md "Added after
the first review / Inference service" and "Added after the second review / Service: fairness under
attack"). Raw sockets, bounded loops, small limits so each attack takes seconds; a random-weight 32x32
package (the answers' values do not matter here). Attackers connect from other loopback addresses
(127.0.0.2 and up) than the legitimate client (127.0.0.1): the per-client caps count by address.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._server import Server, as_json
from tests.test_imageio import _dicom_bytes, _dicom_dataset, dicom_deflate_bomb, jpeg_scan_bomb

pytest.importorskip("fastapi")
pytest.importorskip("pebble")
from medpipe.serve.metrics import process_tree_rss_mb as tree_rss_mb  # noqa: E402 (needs the serve extra)
pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 48
PER_CLIENT_CONNECTIONS = 40
MAX_REQUESTS = 6
MAX_UPLOADS = 8  # per client address
MAX_BODY_MB = 2
LIMITS = ("--backend", "eager", "--header-timeout-s", "1", "--max-connections", str(MAX_CONNECTIONS),
          "--max-connections-per-client", str(PER_CLIENT_CONNECTIONS), "--max-requests", str(MAX_REQUESTS),
          "--max-uploads-per-client", str(MAX_UPLOADS), "--upload-buffer-mb", "12", "--upload-grace-s", "0.5",
          "--min-upload-kbps", "32", "--body-timeout-s", "2", "--max-body-mb", str(MAX_BODY_MB),
          "--decode-timeout-s", "1", "--max-jpeg-scans", "2500", "--decode-workers", "2", "--threads", "1")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    import torch

    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("attack") / "pkg"
    save_package(out, create_model("densenet121", 7), name="attack", arch="densenet121",
                 classes=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], spec=PreprocessSpec(image_size=32))
    return out


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    s = Server(package, *LIMITS, log=tmp_path_factory.mktemp("attack-log") / "server.log").wait_ready()
    yield s
    s.stop()
    text = s.log_text()
    assert "Traceback" not in text, text[-3000:]


# -- helpers ---------------------------------------------------------------------------------------

def png(side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(side * side * 3) % 251).astype(np.uint8).reshape(side, side, 3)).save(buf, "PNG")
    return buf.getvalue()


class RssSampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def read_all(s: socket.socket, timeout: float, closed: list | None = None) -> bytes:
    """Read until the server closes (or the timeout): b'' means closed without an answer.
    ``closed`` (a list) gets True when the server closed the connection, False on timeout."""
    s.settimeout(timeout)
    data, was_closed = b"", True
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        was_closed = False
    except ConnectionResetError:
        pass
    if closed is not None:
        closed.append(was_closed)
    return data


def connect(server, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A connection to the server from loopback address ``source`` (127.0.0.x: another client address)."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout, source_address=(source, 0))


def raw(server, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s, timeout)


def json_error(reply: bytes) -> tuple[int, dict]:
    """Status and JSON body of one raw HTTP response; the body must be the JSON error shape."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), reply[:300]
    err = json.loads(body)
    assert set(err) == {"error", "message", "request_id"}, err
    return status, err


def timed_ping(server) -> tuple[int, float]:
    t = time.perf_counter()
    st = server.request("GET", "/ping", timeout=5)[0]
    return st, time.perf_counter() - t


def metric(server, name: str, labels: str = "") -> float:
    text = server.request("GET", "/metrics")[2].decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- requests that used to be 500, 200 or plain text ----------------------------------------------

def test_bad_framing_malformed_http_and_redirects(server):
    # Content-Length with Transfer-Encoding: 400 JSON, the connection closed, the pipelined request unanswered
    reply = raw(server, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    status, err = json_error(reply)
    assert status == 400 and err["error"] == "ambiguous_framing" and reply.count(b"HTTP/1.1") == 1
    assert b"connection: close" in reply.lower()
    # malformed request line / header / unknown transfer coding: JSON, not uvicorn's plain text
    for bad in (b"GARBAGE\r\n\r\n", b"GET /ping HTTP/1.1\r\nHost x\r\n\r\n",
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"):
        status, err = json_error(raw(server, bad))
        assert status == 400 and err["error"] == "malformed_http"
    # /ping/ is not redirected to a URL built from the Host header
    st, h, b = server.request("GET", "/ping/", headers={"Host": "evil.example"})
    assert st == 404 and "location" not in h and b"evil" not in b
    assert server.request("GET", "/ping")[0] == 200


def test_deep_json_empty_arrays_and_palette_dicom_are_400(server):
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    st, h, b = server.invoke(deep, ctype="application/json")
    assert st == 400 and as_json(b)["error"] == "bad_json" and "nested" in as_json(b)["message"]
    for shape in ((0, 0), (5, 0, 3), (0, 3, 8, 8)):
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.uint8))
        st, h, b = server.invoke(buf.getvalue(), ctype="application/x-npy")
        assert st == 400 and as_json(b)["error"] == "bad_npy" and "no pixels" in as_json(b)["message"], shape
    pytest.importorskip("pydicom")
    st, h, b = server.invoke(_dicom_bytes(_dicom_dataset(pi="PALETTE COLOR")), ctype="application/dicom")
    assert st == 400 and "lookup table" in as_json(b)["message"] and b"Secret" not in b
    assert server.invoke(png(), ctype="image/png")[0] == 200


# -- hostile files -------------------------------------------------------------------------------

def test_dicom_deflate_bomb_is_413_and_memory_stays_flat(server):
    pytest.importorskip("pydicom")
    bomb = dicom_deflate_bomb(1 << 30)  # ~1 MB on the wire, 1 GiB inflated
    before = tree_rss_mb(server.proc.pid)
    with RssSampler(server.proc.pid) as rss:
        for _ in range(3):
            t = time.perf_counter()
            st, h, b = server.invoke(bomb, ctype="application/dicom")
            assert st == 413 and "inflates past" in as_json(b)["message"] and time.perf_counter() - t < 10
            assert timed_ping(server)[1] < 2
    assert rss.peak - before < 150, (before, rss.peak)  # old main: +3 GB per bomb


def test_scan_bomb_is_abandoned_at_its_budget_and_workers_recover(server):
    # 39.6 MP, 2,000 scans, under the scan limit: 8-11 s to decode on the 2-core development machine. (500 scans
    # took 2-3.5 s there, and a faster CI machine decoded them inside the 1 s budget: the test then saw a 200.)
    slow = jpeg_scan_bomb(6000, 6600, 2000)
    with ThreadPoolExecutor(4) as ex:
        t = time.perf_counter()
        bombs = [ex.submit(server.invoke, slow, ctype="image/jpeg") for _ in range(2)]
        time.sleep(0.3)  # both decode workers are now busy with a bomb
        normal = [ex.submit(server.invoke, png(), ctype="image/png") for _ in range(2)]
        for f in bombs:
            st, h, b = f.result(timeout=60)
            assert st == 422 and as_json(b)["error"] == "decode_budget_exceeded", b
        bomb_s = time.perf_counter() - t
        assert all(f.result(timeout=60)[0] == 200 for f in normal)  # served once a worker was replaced
    # abandoned at the 1 s budget: the 422 says so (decoded to the end it would be 200); the time
    # bound only guards against a hang and is loose for a busy CI machine
    assert bomb_s < 30, bomb_s
    # the replaced workers serve normally
    for _ in range(4):
        assert server.invoke(png(), ctype="image/png")[0] == 200
    # far over the scan limit: refused before any decode, at once
    t = time.perf_counter()
    st, h, b = server.invoke(jpeg_scan_bomb(6000, 6600, 20000), ctype="image/jpeg")
    assert st == 422 and "20000 scans" in as_json(b)["message"] and time.perf_counter() - t < 10
    assert metric(server, "medpipe_decode_abandoned_total") >= 3


# -- connections ---------------------------------------------------------------------------------

def test_slow_headers_are_cut_and_one_client_cannot_fill_the_server(server):
    fds_before = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    attackers = []
    for _ in range(3 * MAX_CONNECTIONS):  # far over both caps, every one holding its headers open
        s = connect(server, "127.0.0.2")
        try:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except OSError:
            pass  # refused at the per-client cap: answered and closed
        attackers.append(s)
    tricklers = [connect(server, "127.0.0.3") for _ in range(4)]
    pings, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < 2.5:  # tricklers send a byte every 0.2 s: still cut at 1 s
        for s in tricklers:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        pings.append(timed_ping(server))
        # open connections plus the accepting thread's waiting room (serve/acceptor.py), each max_connections
        assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) <= fds_before + 2 * MAX_CONNECTIONS + 8
        time.sleep(0.2)
    assert all(st == 200 for st, _ in pings) and max(s for _, s in pings) < 2, pings
    closed: list[bool] = []
    answers = [read_all(s, 3, closed) for s in attackers + tricklers]
    for s in attackers + tricklers:
        s.close()
    # every connection was closed by the server: over the per-client cap at once with 503 (a connection that
    # has started its request is never displaced), the rest at the header timeout with 408
    assert all(closed)
    codes = collections.Counter(json_error(a)[1]["error"] for a in answers if a)
    assert set(codes) <= {"too_many_connections", "header_timeout"}, codes
    assert all(json_error(a)[1]["error"] == "header_timeout" for a in answers[-len(tricklers):])
    assert metric(server, "medpipe_connections_closed_total", '{reason="header_timeout"}') >= 4
    # how many met the per-client cap depends on how many were opened within the 1 s header timeout (the
    # cap itself: test_eviction_prefers_silent_connections_of_the_biggest_client)
    assert metric(server, "medpipe_connections_closed_total", '{reason="client_over_capacity"}') >= (
        codes["too_many_connections"])


def test_eviction_prefers_silent_connections_of_the_biggest_client():
    """The policy, step by step: at the cap a new connection displaces a silent connection (nothing of a
    request sent) of the address holding the most silent connections, oldest first; one that has started
    its request is never displaced; the per-client cap displaces that address's own oldest silent one."""
    from medpipe.serve.connections import ConnectionLimits, _Shared

    class Conn:
        def __init__(self, peer):
            self.peer, self.dropped = peer, False

        def drop(self, reason):
            self.dropped = reason
            shared.remove(self)

    def open_(peer, silent=True):
        c = Conn(peer)
        c._counted = True
        refused = shared.add(c)
        if refused:
            shared.remove(c)
        elif silent:
            shared.set_silent(c)
        return c, refused

    # the connection cap (5)
    shared = _Shared(ConnectionLimits(10.0, max_connections=5))
    honest, _ = open_("10.0.0.1")  # quiet for now: it will send its headers later
    f1, _ = open_("10.0.0.9")
    f2, _ = open_("10.0.0.9")
    busy = [open_("10.0.0.1", silent=False)[0] for _ in range(2)]  # the honest client's requests in progress
    assert shared.open == 5
    # 10.0.0.1 holds the most connections (3), 10.0.0.9 the most silent ones (2): its oldest goes
    f3, refused = open_("10.0.0.9")
    assert refused is None and f1.dropped == "evicted" and not honest.dropped and shared.open == 5
    f4, _ = open_("10.0.0.9")
    assert f2.dropped == "evicted" and not honest.dropped
    shared.set_busy(f3)  # f3 sends a request: 10.0.0.9 and 10.0.0.1 now hold one silent connection each
    x, _ = open_("10.0.0.5")  # as many silent connections: the oldest silent connection goes (honest, not f4)
    assert honest.dropped == "evicted" and not f3.dropped and not f4.dropped
    for conn in (f4, x):
        shared.set_busy(conn)  # every connection now sends a request: none can be displaced
    _, refused = open_("10.0.0.6")
    assert refused == "over_capacity" and shared.open == 5 and not any(c.dropped for c in busy + [f3, f4, x])
    # the per-client cap (3)
    shared = _Shared(ConnectionLimits(10.0, max_connections=100, max_connections_per_client=3))
    x1, _ = open_("10.0.0.2")
    x2, _ = open_("10.0.0.2", silent=False)
    x3, _ = open_("10.0.0.2", silent=False)
    x4, refused = open_("10.0.0.2")  # over its cap: its own silent connection goes
    assert refused is None and x1.dropped == "evicted" and shared.per_peer["10.0.0.2"] == 3
    shared.set_busy(x4)
    _, refused = open_("10.0.0.2")
    assert refused == "client_over_capacity" and not any(x.dropped for x in (x2, x3, x4))
    assert open_("10.0.0.1")[1] is None and shared.open == 4


def test_connection_flood_never_evicts_a_client_sending_its_request(server):
    """A flood of connections from several addresses at the connection cap, each asking /ping once and then
    holding its keep-alive connection silent (connections that send nothing at all wait in the kernel:
    TCP_DEFER_ACCEPT), while an honest client connects, waits 0.3 s and only then sends its headers: the cap
    displaces the flood's idle connections (from the addresses holding the most), never the honest one."""
    stop, opened = threading.Event(), collections.Counter()

    def flood(source):
        held: list[socket.socket] = []
        while not stop.is_set():
            try:
                s = connect(server, source, timeout=2)
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append(s)
                opened[source] += 1
            except OSError:
                time.sleep(0.01)
            if len(held) > PER_CLIENT_CONNECTIONS:
                held.pop(0).close()
        for s in held:
            s.close()

    evicted_before = metric(server, "medpipe_connections_closed_total", '{reason="evicted"}')
    sources = [f"127.0.0.{i}" for i in range(4, 8)]
    threads = [threading.Thread(target=flood, args=(src,)) for src in sources]
    for t in threads:
        t.start()
    answers = []
    try:
        time.sleep(0.5)  # the server is at its cap
        for _ in range(10):
            with connect(server, timeout=10) as s:
                time.sleep(0.3)
                s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answers.append(read_all(s, 10)[:12])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert answers == [b"HTTP/1.1 200"] * 10, answers
    assert metric(server, "medpipe_connections_closed_total", '{reason="evicted"}') - evicted_before >= 10, opened


def _trickle_bodies(server, sources: list[str], per_source: int, stop: threading.Event, answers: collections.Counter):
    """Keep ``per_source`` connections per address uploading a body at about 5 bytes/s (reconnecting when cut),
    counting what the server answered them."""
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n")
    socks: list[socket.socket] = []
    while not stop.is_set():
        while len(socks) < per_source * len(sources):
            try:
                s = connect(server, sources[len(socks) % len(sources)])
                s.sendall(head)
                s.setblocking(False)
                socks.append(s)
            except OSError:
                break
        time.sleep(0.2)
        alive = []
        for s in socks:
            try:
                s.send(b"\x89")
                reply = s.recv(65536)
                answers[json_error(reply)[1]["error"] if reply else "closed"] += 1
                s.close()
            except BlockingIOError:
                alive.append(s)
            except OSError:
                answers["reset"] += 1
                s.close()
        socks = alive
    for s in socks:
        s.close()


def test_slow_uploaders_cannot_hold_the_processing_slots(server):
    """40 connections (5 addresses x the per-client cap) trickle bodies, far more than the 6 processing slots:
    a body holds a slot only once complete, so the honest client's requests are all answered 200; the
    tricklers are cut at the minimum upload rate after the grace period (408) and reconnect."""
    stop, answers = threading.Event(), collections.Counter()
    sources = [f"127.0.0.{i}" for i in range(10, 15)]
    t = threading.Thread(target=_trickle_bodies, args=(server, sources, MAX_UPLOADS, stop, answers))
    t.start()
    try:
        time.sleep(0.3)
        legit = [server.invoke(png(), ctype="image/png", timeout=30)[0] for _ in range(10)]
        # one more upload from an address at its cap is refused before its body is read
        extra = [connect(server, sources[0]) for _ in range(MAX_UPLOADS + 2)]
        for s in extra:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 9\r\n\r\n")
        refused = [json_error(r)[1]["error"] for r in (read_all(s, 3) for s in extra) if r]
        for s in extra:
            s.close()
    finally:
        stop.set()
        t.join(30)
    assert legit == [200] * 10, (legit, answers)
    assert answers["upload_too_slow"] >= len(sources) * MAX_UPLOADS, answers
    assert "too_many_uploads" in refused, refused
    assert set(answers) <= {"upload_too_slow", "too_many_uploads", "closed", "reset"}, answers
    assert metric(server, "medpipe_uploads_refused_total", '{reason="too_slow"}') >= len(sources) * MAX_UPLOADS


def test_held_bodies_hold_upload_places_not_processing_slots(server):
    declared = MAX_BODY_MB * 2**20
    head = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    holders = []
    for _ in range(MAX_UPLOADS + 10):  # each sends 64 KB of its 2 MB body and never the rest
        s = connect(server, "127.0.0.20")
        s.sendall(head + b"\x00" * 65536)
        holders.append(s)
    st, secs = timed_ping(server)
    assert st == 200 and secs < 2
    assert server.invoke(png(), ctype="image/png")[0] == 200  # they hold no processing slot
    # MAX_UPLOADS get upload places and are cut when their rate or the 2 s body timeout runs out (408); the rest
    # are refused (503) without their body being read: they never sent it, and still got an answer
    answers = [json_error(read_all(s, 15)) for s in holders]
    for s in holders:
        s.close()
    codes = sorted((status, err["error"].replace("upload_too_slow", "body_timeout")) for status, err in answers)
    assert codes == [(408, "body_timeout")] * MAX_UPLOADS + [(503, "too_many_uploads")] * 10, codes
    assert server.invoke(png(), ctype="image/png")[0] == 200


def test_memory_stays_under_the_ceiling_during_a_body_flood(server):
    body = b"\xff" * (MAX_BODY_MB * 2**20 - 100)
    head = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    ceiling = metric(server, "medpipe_memory_ceiling_megabytes")
    before = tree_rss_mb(server.proc.pid)
    assert before < ceiling

    def flood(_):
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(head)
                try:
                    s.sendall(body)
                except OSError:
                    pass  # refused before its body was read: the server closed
                r = read_all(s, 10)
                return json_error(r)[0] if r else 0
        except OSError:
            return 0

    with RssSampler(server.proc.pid) as rss, ThreadPoolExecutor(64) as ex:
        statuses = list(ex.map(flood, range(160)))  # 320 MB sent, 64 at a time
    assert set(statuses) <= {0, 400, 415, 503} and statuses.count(503) > 50, statuses
    assert rss.peak < ceiling and rss.peak - before < 160, (before, rss.peak, ceiling)
    assert timed_ping(server)[0] == 200 and server.invoke(png(), ctype="image/png")[0] == 200


# -- SIGTERM mid-attack and the port ---------------------------------------------------------------

def test_sigterm_during_a_stuck_decode_and_attack_exits_0_with_json(package, tmp_path):
    s = Server(package, "--backend", "eager", "--decode-timeout-s", "300", "--max-jpeg-scans", "0",
               "--graceful-s", "3", "--header-timeout-s", "20", "--upload-grace-s", "20", "--threads", "1",
               log=tmp_path / "server.log").wait_ready()
    try:
        bomb = jpeg_scan_bomb(6000, 6600, 20000)  # minutes to decode: stuck when SIGTERM comes
        slow = []
        for _ in range(30):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(b"GET /ping HTTP/1.1\r\nHo")
            slow.append(c)
        held = []
        for _ in range(3):  # bodies still arriving at SIGTERM are answered at once, not after 20 s
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b"\x00" * 1000)
            held.append(c)
        with ThreadPoolExecutor(2) as ex:
            stuck = [ex.submit(s.invoke, bomb, ctype="image/jpeg", timeout=40) for _ in range(2)]
            time.sleep(1.5)
            t = time.perf_counter()
            s.proc.send_signal(signal.SIGTERM)
            code = s.proc.wait(40)
            elapsed = time.perf_counter() - t
            answers = [f.result(timeout=5) for f in stuck]
        assert code == 0 and elapsed < 15, (code, elapsed)  # graceful_s 3 + shutdown, not body_timeout_s 20
        for st, h, b in answers:  # JSON answers only
            assert st == 503 and h["content-type"] == "application/json" and as_json(b)["error"] == "shutting_down"
        for c in slow:
            assert read_all(c, 2) == b""
            c.close()
        for c in held:
            status, err = json_error(read_all(c, 2))
            assert status == 503 and err["error"] == "shutting_down"
            c.close()
    finally:
        s.stop()
    text = s.log_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


def test_busy_port_is_a_clear_error_and_serving_is_logged_after_binding(server, package):
    assert f"serving on http://127.0.0.1:{server.port}" in server.log_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "medpipe", "serve", "--model", str(package), "--port", str(port)],
                           capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in out
    assert "serving on" not in out and "Traceback" not in out


def test_demo_refuses_a_taken_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(["bash", "scripts/demo.sh", "false", str(tmp_path / "demo")], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "DEMO_PORT": str(port)},
                           cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and f"port {port}" in r.stderr and "already in use" in r.stderr
    assert not (tmp_path / "demo" / "ham").exists()  # refused before any work


def test_palette_dicom_is_an_error_row_in_batch(package, tmp_path):
    pytest.importorskip("pydicom")
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        (inp / f"ok{i}.png").write_bytes(png(40 + i))
    (inp / "palette.dcm").write_bytes(_dicom_bytes(_dicom_dataset(pi="PALETTE COLOR")))
    r = subprocess.run([sys.executable, "-m", "medpipe", "batch", "--model", str(package), "--input", str(inp),
                        "--output", str(tmp_path / "out"), "--max-error-rate", "0.5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    by_name = {row["id"]: row for row in rows}
    assert "lookup table" in json.dumps(by_name["palette.dcm"]) and "label" not in by_name["palette.dcm"]
    assert all("label" in by_name[f"ok{i}.png"] for i in range(3))


def test_decode_process_out_of_memory_is_413_and_the_worker_lives_on():
    import asyncio

    from medpipe.data.imageio import ImageTooLargeError
    from medpipe.data.decodepool import DecodePool, DecodeSpec

    big = np.zeros((4000, 5000, 4), np.uint8)
    big[::9, ::7] = 200
    buf = io.BytesIO()
    Image.fromarray(big, "RGBA").save(buf, "PNG", compress_level=1)  # 20 MP RGBA: ~0.5 GB to decode and flatten
    pool = DecodePool(DecodeSpec((32, 32), "bicubic"), workers=1, timeout_s=60, memory_mb=384)
    try:
        pool.warm_up()

        async def run():
            return [await pool.decode("bytes", buf.getvalue()),
                    await pool.decode("array", np.full((3000, 5000, 3), 7, np.uint8))]  # 45 MB to receive

        refused, fine = asyncio.run(run())
        assert isinstance(refused, ImageTooLargeError) and "memory" in refused.reason
        assert fine.shape == (32, 32, 3) and pool.restarts == 0  # the same worker took the next image
    finally:
        pool.close()


def test_accepted_connections_do_not_wait_for_nagle():
    """The listening socket says TCP, so asyncio sets TCP_NODELAY on every accepted connection (with proto 0 it
    did not: a response's body waited for the client's delayed ACK of its headers, +40 ms per keep-alive
    request, measured by benchmarks/serve_load.py); the connection protocol sets it too."""
    import asyncio
    import socket

    from medpipe.serve.app import bind_socket
    from medpipe.serve.connections import ConnectionLimits, protocol_class

    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    port = sock.getsockname()[1]
    seen = {}

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen["asyncio"] = transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            transport.close()

    async def main():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen["asyncio"] != 0

    # medpipe's own protocol sets it whatever socket it is given (here one made with proto 0)
    class Transport:
        def __init__(self, s):
            self.s = s

        def get_extra_info(self, key, default=None):
            return {"socket": self.s, "sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(key, default)

        def write(self, data):
            pass

        def close(self):
            pass

        def is_closing(self):
            return False

        def set_protocol(self, p):
            pass

    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        from uvicorn.config import Config
        from uvicorn.server import ServerState

        cls = protocol_class(ConnectionLimits(5.0, 10))
        loop = asyncio.new_event_loop()
        try:
            proto = cls(config=Config(app=None), server_state=ServerState(), app_state={}, _loop=loop)
            proto.connection_made(Transport(plain))
            assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            proto._cancel_timer()
        finally:
            loop.close()
    finally:
        plain.close()


def test_connections_that_send_nothing_are_not_handed_to_the_server():
    """The server's listening socket defers accept (TCP_DEFER_ACCEPT, Linux): a connection that sends
    nothing never reaches the event loop, so it takes no connection slot and displaces nobody."""
    import asyncio

    from medpipe.serve.app import bind_socket

    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        pytest.skip("TCP_DEFER_ACCEPT is Linux's")
    sock = bind_socket("127.0.0.1", 0, defer_accept_s=5)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    port = sock.getsockname()[1]
    made: list[float] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            made.append(time.perf_counter())

    async def main():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, silent = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.5)
        before = len(made)
        _, talker = await asyncio.open_connection("127.0.0.1", port)
        talker.write(b"GET /ping HTTP/1.1\r\n")
        for _ in range(200):
            if len(made) > before:
                break
            await asyncio.sleep(0.01)
        for w in (silent, talker):
            w.close()
        server.close()
        return before, len(made)

    assert asyncio.run(main()) == (0, 1)
