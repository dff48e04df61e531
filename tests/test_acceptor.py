"""The accepting thread's waiting room (medpipe/serve/acceptor.py), driven by real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from medpipe.serve.acceptor import Acceptor


class Recorder(asyncio.Protocol):
    """Records which connections reach the event loop, and what they sent."""

    made: list = []

    def connection_made(self, transport):
        self.transport = transport
        self.data = b""
        Recorder.made.append(self)

    def data_received(self, data):
        self.data += data


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.bind(("127.0.0.1", 0))
    return s


async def _until(cond, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _closed_by_server(s: socket.socket, seconds: float = 5.0) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def run(coro_fn, **kwargs):
    Recorder.made = []
    closes: list[str] = []

    async def main():
        loop = asyncio.get_running_loop()
        sock = _listener()
        acc = Acceptor(sock, loop, Recorder, on_close=closes.append, **kwargs).start(128)
        try:
            return await coro_fn(sock.getsockname()[1], loop)
        finally:
            acc.close()
            await acc.wait_closed()
            sock.close()

    return asyncio.run(main()), closes


def test_a_talking_connection_reaches_the_loop_with_its_bytes_and_a_silent_one_does_not():
    async def case(port, loop):
        silent = _connect(port)
        closer = _connect(port)
        closer.close()  # a flood's connection: closed before sending anything
        talker = _connect(port)
        talker.sendall(b"GET /ping HTTP/1.1\r\n\r\n")
        assert await _until(lambda: len(Recorder.made) == 1)
        await asyncio.sleep(0.3)
        got = [p.data for p in Recorder.made]
        silent.close(), talker.close()
        return got

    (got, _) = run(case)
    assert got == [b"GET /ping HTTP/1.1\r\n\r\n"]  # peeked, not consumed; only the talker was handed over


def test_a_silent_connection_is_closed_at_its_deadline():
    async def case(port, loop):
        silent = _connect(port)
        t = time.monotonic()
        closed = await loop.run_in_executor(None, _closed_by_server, silent, 5.0)
        return closed, time.monotonic() - t, len(Recorder.made)

    (closed, took, made), closes = run(case, wait_s=0.3)
    assert closed and 0.2 < took < 4.0 and made == 0
    assert closes == ["waiting_timeout"]


def test_a_full_waiting_room_displaces_the_biggest_address_not_the_lone_client():
    async def case(port, loop):
        honest = _connect(port, "127.0.0.3")
        await asyncio.sleep(0.1)
        flood = [_connect(port, "127.0.0.2") for _ in range(12)]
        await asyncio.sleep(0.3)
        honest.sendall(b"GET /ping HTTP/1.1\r\n\r\n")  # still waiting after 12 newer connections: handed over
        ok = await _until(lambda: len(Recorder.made) == 1)
        evicted = sum(await asyncio.gather(*(loop.run_in_executor(None, _closed_by_server, s, 0.5) for s in flood)))
        for s in flood + [honest]:
            s.close()
        return ok, evicted

    (ok, evicted), closes = run(case, max_waiting=4)
    assert ok
    assert evicted == 9 and closes.count("evicted_waiting") == 9  # 13 arrived, room for 4: 9 of the flood's went


def test_ready_connections_are_handed_over_round_robin_across_addresses():
    """The event loop is busy while 20 connections from one address and then 1 from another send their
    first bytes: with one hand-over at a time, the lone address's connection is among the first handed
    over, not behind the 20."""

    async def case(port, loop):
        socks = []

        def connect_all():
            for i in range(20):
                s = _connect(port, "127.0.0.2")
                s.sendall(b"A%02d" % i)
                socks.append(s)
            s = _connect(port, "127.0.0.3")
            s.sendall(b"B")
            socks.append(s)

        connecting = loop.run_in_executor(None, connect_all)
        time.sleep(1.5)  # the event loop is blocked: no hand-over completes; the acceptor thread goes on
        await connecting
        assert await _until(lambda: len(Recorder.made) == 21, 10.0)
        await asyncio.sleep(0.2)
        order = [p.data for p in Recorder.made]
        for s in socks:
            s.close()
        return order

    (order, _) = run(case, handover_slots=1)
    assert sorted(order) == sorted([b"A%02d" % i for i in range(20)] + [b"B"])
    assert order.index(b"B") <= 3, order


@pytest.mark.parametrize("slots", [1, 8])
def test_close_stops_accepting_and_closes_the_waiting(slots):
    async def case(port, loop):
        silent = _connect(port)
        await asyncio.sleep(0.2)
        return silent

    silent, _ = run(case, handover_slots=slots)
    assert _closed_by_server(silent, 2.0)
    silent.close()
