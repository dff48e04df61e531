"""Connection-level limits: a thin subclass of uvicorn's h11 protocol.

uvicorn (0.55) has no timeout before a request's headers are complete, accepts any number of
connections (``limit_concurrency`` only answers 503 *after* the headers arrive, and in plain text),
and answers malformed HTTP in plain text. Each of those lets one client exhaust the service, so
this protocol class adds, per connection:

- **header timeout**: a connection that has not sent a complete request line and headers within
  ``header_timeout_s`` of connecting (or of its previous answer, on keep-alive) is closed; if it had
  sent part of a request it gets a 408 JSON body first;
- **connection cap and eviction**: at ``max_connections`` open connections a new connection displaces
  one that has sent nothing of a request yet (just connected, or idle between keep-alive requests),
  taken from the client address holding the most such silent connections, oldest first (among
  addresses holding as many, the oldest silent connection). A connection that
  has started sending its request is never displaced (the header timeout bounds it). With no such
  connection to displace, the new one gets 503 JSON and is closed at once, without reading;
- **per-client cap**: one client address holds at most ``max_connections_per_client`` connections
  (0: no cap); over it, that address's own oldest silent connection is displaced, else 503 JSON;
- **malformed HTTP** (bad request line or headers, headers over 64 KB, unknown transfer coding):
  400 JSON and the connection closed, like every other error.

Connections that send nothing at all are not handed over by the kernel in the first place
(``TCP_DEFER_ACCEPT`` on the listening socket, medpipe/serve/app.py ``bind_socket``).

Everything else (parsing, flow control, keep-alive) is uvicorn's, so the ASGI app and its routes
(including any added later) see the same limits. Request-level limits (authentication, framing, body
size, upload rate and admission) are in medpipe/serve/app.py and medpipe/serve/guard.py.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger("medpipe.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 256
    max_connections_per_client: int = 0  # 0: no per-address cap


def raw_json_response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response with the JSON error body, for when no request was parsed."""
    body = json.dumps({"error": code, "message": message, "request_id": uuid.uuid4().hex[:16]}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode()
    return head + body


def peer_of(transport) -> str:
    """The client's address (no port): what the per-client caps and the eviction order count by."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "-"


class _Shared:
    """State shared by every connection of one server: open connections per client address, and the
    connections that have sent nothing of a request yet ("silent"), per address, oldest first."""

    def __init__(self, limits: ConnectionLimits, on_close=None):
        self.limits = limits
        self.open = 0
        self.per_peer: collections.Counter = collections.Counter()
        self.silent: dict[str, dict] = {}  # peer -> {protocol: silent since}, insertion order = oldest first
        self.on_close = on_close or (lambda reason: None)

    def add(self, proto) -> str | None:
        """Count a new connection; displace another if a cap is reached. The refusal reason, or None."""
        self.open += 1
        self.per_peer[proto.peer] += 1
        cap = self.limits.max_connections_per_client
        if cap and self.per_peer[proto.peer] > cap and not self._evict(proto, only=proto.peer):
            return "client_over_capacity"
        if self.open > self.limits.max_connections and not self._evict(proto):
            return "over_capacity"
        return None

    def remove(self, proto) -> None:
        self.set_busy(proto)
        if getattr(proto, "_counted", False):
            proto._counted = False
            self.open -= 1
            self.per_peer[proto.peer] -= 1
            if self.per_peer[proto.peer] <= 0:
                del self.per_peer[proto.peer]

    def set_silent(self, proto) -> None:
        conns = self.silent.setdefault(proto.peer, {})
        conns.pop(proto, None)
        conns[proto] = time.monotonic()  # newest last

    def set_busy(self, proto) -> None:
        conns = self.silent.get(proto.peer)
        if conns is not None and conns.pop(proto, None) is not None and not conns:
            del self.silent[proto.peer]

    def is_silent(self, proto) -> bool:
        return proto in self.silent.get(proto.peer, ())

    def _evict(self, keep, only: str | None = None) -> bool:
        """Drop the oldest silent connection (not ``keep``) of ``only``, or of the address holding the most
        silent connections (not the most connections: a busy honest client has many, all sending)."""
        if only is None and self.silent:
            # the most silent connections; among equals, the oldest silent connection (dict values: since when)
            only = max(self.silent, key=lambda peer: (len(self.silent[peer]), -next(iter(self.silent[peer].values()))))
        for proto in self.silent.get(only, ()):
            if proto is not keep:
                proto.drop("evicted")
                return True
        return False


def _refusal(limits: ConnectionLimits, reason: str) -> bytes:
    msg = (f"the server holds its maximum of {limits.max_connections} connections; retry shortly"
           if reason == "over_capacity" else f"this client address holds its maximum of "
           f"{limits.max_connections_per_client} connections; retry shortly")
    return raw_json_response(503, "Service Unavailable", "too_many_connections", msg, "retry-after: 1\r\n")


def _dropped_response(limits: ConnectionLimits) -> bytes:
    """The 408 for a connection cut off while sending its headers."""
    return raw_json_response(408, "Request Timeout", "header_timeout",
                             f"request headers not received within {limits.header_timeout_s:g} s")


def _no_delay(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # headers and body of a response go out at once (see serve/app.py bind_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def protocol_class(limits: ConnectionLimits, on_close=None) -> type:
    """A uvicorn HTTP protocol class enforcing ``limits``; ``on_close(reason)`` counts closes we force."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    shared = _Shared(limits, on_close)

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None
        _counted = False
        peer = "-"

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            _no_delay(transport)
            self.peer, self._counted = peer_of(transport), True
            refused = shared.add(self)
            if refused:
                shared.remove(self)
                shared.on_close(refused)
                transport.write(_refusal(limits, refused))
                transport.close()
                return
            self._await_headers()

        # -- header timeout: silent (nothing of a request yet), then sending headers ----------------
        def _await_headers(self) -> None:
            shared.set_silent(self)
            self._cancel_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self.drop, "header_timeout")

        def _cancel_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_done(self) -> None:
            shared.set_busy(self)
            self._cancel_timer()

        def drop(self, reason: str) -> None:
            """Close a connection waiting for its request's headers (timeout, or evicted at the cap)."""
            partial = self._header_timer is not None and not shared.is_silent(self)
            self._headers_done()
            shared.remove(self)
            if self.transport.is_closing():
                return
            shared.on_close(reason)
            if partial:  # it was sending a request: say why it is cut off
                self.transport.write(_dropped_response(limits))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is not None:
                shared.set_busy(self)  # started a request: never evicted (the header timeout bounds it)
            super().data_received(data)
            if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
                self._headers_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()  # keep-alive: the next request's headers have the same budget

        def connection_lost(self, exc) -> None:
            self._headers_done()
            shared.remove(self)
            super().connection_lost(exc)

        # -- malformed HTTP gets the JSON error body -----------------------------------------------
        def send_400_response(self, msg: str) -> None:
            self._headers_done()
            shared.on_close("malformed_http")
            self.transport.write(raw_json_response(400, "Bad Request", "malformed_http",
                                                   "malformed HTTP request line or headers"))
            self.transport.close()

    return GuardedH11Protocol
