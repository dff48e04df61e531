"""Accepting connections on a thread, with a waiting room for connections that have sent nothing yet.

Why: under a connection flood every connection the flood opens reaches the listening socket's accept
queue sooner or later, even with ``TCP_DEFER_ACCEPT``: once the kernel's SYN queue is full it answers
with SYN cookies, and a cookie-completed connection cannot be deferred; a connection the flood closes
is handed over by its FIN. asyncio's own accept path builds a transport, a task and uvicorn's protocol
for each of them on the event loop (~0.2 ms of Python each); at ~1,600 connections a second on a busy
2-core machine the loop falls behind, the accept queue fills, and the kernel drops an honest client's
SYN, which the client retransmits only after 1 s (measured: ``/ping`` p99 1.0-1.4 s with
benchmarks/attack.py --round2).

What: one thread accepts as fast as the kernel hands connections over (``accept`` releases the GIL) and
parks each new connection in a waiting room (an epoll set) until its first bytes arrive:

- bytes arrive: the connection goes to the event loop (``loop.connect_accepted_socket``, TLS included),
  where medpipe's protocol (serve/connections.py) applies the header timeout and the connection caps;
- the peer closes first (a flood's FIN): closed on the thread, the event loop never sees it;
- nothing within ``wait_s`` (the header timeout): closed without an answer, as the kernel's deferred
  accept does;
- the room is full (``max_waiting``): the oldest waiting connection of the client address holding the
  most waiting connections is closed to make room, so a flood from a few addresses displaces its own
  connections, never an honest client's single one.

Connections whose first bytes arrived are handed to the event loop at most ``handover_slots`` at a time,
round-robin across client addresses: a flood's backlog waits here, where an honest client's connection
overtakes it, instead of in the kernel's FIFO accept queue or in front of the event loop.

Only the waiting room is on this thread; every byte of HTTP is still parsed on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import selectors
import socket
import threading
import time

log = logging.getLogger("medpipe.serve")
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}


class Acceptor:
    """Stands in for the ``asyncio.Server`` uvicorn creates: same ``close``/``wait_closed``/``sockets``."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, protocol_factory, *,
                 ssl=None, ssl_handshake_timeout: float | None = None, wait_s: float = 10.0,
                 max_waiting: int = 1024, handover_slots: int = 8, on_close=None):
        self.sock, self.loop, self.factory = sock, loop, protocol_factory
        self.ssl, self.handshake_timeout = ssl, ssl_handshake_timeout
        self.wait_s, self.max_waiting = float(wait_s), int(max_waiting)
        self.on_close = on_close or (lambda reason: None)
        self.sockets = [sock]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._closed = threading.Event()
        self._slots = threading.Semaphore(handover_slots)
        self._thread = threading.Thread(target=self._run, name="medpipe-acceptor", daemon=True)
        # every waiting connection, in arrival order (deadline = arrival + wait_s), and per client address
        self._queue: collections.OrderedDict = collections.OrderedDict()  # conn -> (peer, deadline)
        self._per_peer: dict[str, collections.OrderedDict] = {}
        # connections whose first bytes arrived, per client address, served round-robin across addresses
        self._ready: collections.OrderedDict = collections.OrderedDict()  # peer -> deque of conns
        self._warned = 0.0

    # -- asyncio.Server's surface, as uvicorn uses it ------------------------------------------------------
    def start(self, backlog: int = 128) -> Acceptor:
        # the kernel queue stays as uvicorn sizes it: a longer one, measured at 1,024, held honest clients
        # behind a flood in the kernel longer than an occasional dropped SYN costs
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self._sel.register(self.sock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def is_serving(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    def close(self) -> None:
        """Stop accepting; connections still waiting are closed (none of them is being answered)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    async def wait_closed(self) -> None:
        while self._thread.is_alive():
            await asyncio.sleep(0.01)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # closed, or the buffer is full of wake-ups already: either way it will look
            pass

    # -- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                timeout = self._expire()
                for key, _ in self._sel.select(timeout):
                    if key.data == "listen":
                        self._accept_all()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._first_bytes(key.fileobj)
                self._dispatch()
        except Exception:  # never leave the port without an acceptor silently
            log.exception("the connection acceptor stopped; no new connections are accepted")
        finally:
            for conn in list(self._queue):
                self._forget(conn)
                conn.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept_all(self) -> None:
        for _ in range(4096):  # everything queued now, but give the waiting connections a turn
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                # out of file descriptors or memory: say so once a second, back off a little, keep serving
                if time.monotonic() - self._warned > 1.0:
                    self._warned = time.monotonic()
                    log.warning("accept failed: %s", exc)
                time.sleep(0.01)
                return
            conn.setblocking(False)
            peer = str(addr[0]) if isinstance(addr, tuple) and addr else "-"
            if len(self._queue) >= self.max_waiting:
                self._evict()
            self._queue[conn] = (peer, time.monotonic() + self.wait_s)
            self._per_peer.setdefault(peer, collections.OrderedDict())[conn] = None
            self._sel.register(conn, selectors.EVENT_READ, "conn")

    def _first_bytes(self, conn: socket.socket) -> None:
        if conn not in self._queue:  # evicted or expired earlier in this same round of events
            return
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        if not first:  # closed (or reset) before sending anything
            self._forget(conn)
            conn.close()
            return
        self._sel.unregister(conn)
        self._ready.setdefault(self._queue[conn][0], collections.deque()).append(conn)

    def _dispatch(self) -> None:
        """Hand ready connections to the event loop, one client address after another, while fewer than
        ``handover_slots`` hand-overs are under way: a flood's backlog stays here, where an honest client's
        connection overtakes it, instead of queueing in front of the event loop."""
        while self._ready and self._slots.acquire(blocking=False):
            peer, conns = next(iter(self._ready.items()))
            conn = conns.popleft()
            if conns:
                self._ready.move_to_end(peer)
            else:
                del self._ready[peer]
            self._forget(conn, ready=False)
            self.loop.call_soon_threadsafe(self._hand_over, conn)

    def _expire(self) -> float | None:
        """Close connections past their deadline; seconds until the next deadline (None: nothing waits)."""
        now = time.monotonic()
        while self._queue:
            conn, (peer, deadline) = next(iter(self._queue.items()))
            if deadline > now:
                return deadline - now
            self._forget(conn)
            conn.close()
            self.on_close("waiting_timeout")
        return None

    def _evict(self) -> None:
        peer = max(self._per_peer, key=lambda p: len(self._per_peer[p]))
        conn = next(iter(self._per_peer[peer]))
        self._forget(conn)
        conn.close()
        self.on_close("evicted_waiting")

    def _forget(self, conn: socket.socket, ready: bool | None = None) -> None:
        """Drop ``conn`` from the waiting room (``ready``: whether it is in the ready queues, None: look)."""
        peer, _ = self._queue.pop(conn)
        conns = self._per_peer[peer]
        del conns[conn]
        if not conns:
            del self._per_peer[peer]
        queued = self._ready.get(peer) if ready is not False else None
        if queued is not None and conn in queued:
            queued.remove(conn)
            if not queued:
                del self._ready[peer]
        elif ready is None:
            self._sel.unregister(conn)

    # -- on the event loop ---------------------------------------------------------------------------------
    def _hand_over(self, conn: socket.socket) -> None:
        if self._closed.is_set():
            conn.close()
            self._slots.release()
            return
        kwargs = {"ssl": self.ssl, "ssl_handshake_timeout": self.handshake_timeout} if self.ssl else {}
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn, **kwargs))
        task.add_done_callback(self._handed_over)

    def _handed_over(self, task: asyncio.Task) -> None:
        self._slots.release()
        self._wake()
        if not task.cancelled() and task.exception() is not None:
            log.info("a connection failed before its first request: %s", task.exception())


def waiting_room_size(max_connections: int) -> int:
    """How many connections may wait for their first bytes (or for a hand-over slot): as many as the
    server may hold open, so the process holds at most twice ``max_connections`` client sockets."""
    return max(1, int(max_connections))
