"""Connection-level limits: a thin subclass of uvicorn's h11 protocol.

uvicorn (0.54) has no timeout before a request's headers are complete, accepts any number of
connections (``limit_concurrency`` only answers 503 *after* the headers arrive, and in plain text),
and answers malformed HTTP in plain text. Each of those lets one client exhaust the service, so
this protocol class adds, per connection:

- **header timeout**: a connection that has not sent a complete request line and headers within
  ``header_timeout_s`` of connecting (or of its previous answer, on keep-alive) is closed; if it had
  sent part of a request it gets a 408 JSON body first;
- **connection cap**: at ``max_connections`` open connections, a new connection displaces the one
  that has waited longest for its headers (a trickler or an idle keep-alive); when every connection
  is busy with a request, the new one gets 503 JSON and is closed at once, without reading;
- **malformed HTTP** (bad request line or headers, headers over 64 KB, unknown transfer coding):
  400 JSON and the connection closed, like every other error.

Everything else (parsing, flow control, keep-alive) is uvicorn's, so the ASGI app and its routes
(including any added later) see the same limits. Request-level limits (Content-Length together
with Transfer-Encoding, body size, body memory, admission) are in medpipe/serve/app.py.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from dataclasses import dataclass

log = logging.getLogger("medpipe.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 256


def raw_json_response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response with the JSON error body, for when no request was parsed."""
    body = json.dumps({"error": code, "message": message, "request_id": uuid.uuid4().hex[:16]}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode()
    return head + body


class _Shared:
    """State shared by every connection of one server."""

    def __init__(self, limits: ConnectionLimits, on_close=None):
        self.limits = limits
        self.waiting: dict = {}  # connections waiting for headers, oldest first (dicts keep insertion order)
        self.on_close = on_close or (lambda reason: None)

    def evict_oldest_waiting(self, keep) -> bool:
        for proto in self.waiting:
            if proto is not keep:
                proto.drop("evicted")
                return True
        return False


def _over_capacity_response(limits: ConnectionLimits) -> bytes:
    return raw_json_response(503, "Service Unavailable", "too_many_connections",
                             f"the server holds its maximum of {limits.max_connections} connections; retry shortly",
                             "retry-after: 1\r\n")


def _dropped_response(limits: ConnectionLimits, reason: str) -> bytes:
    """The 408 for a connection cut off while sending its headers (timeout, or displaced at the cap)."""
    msg = (f"request headers not received within {limits.header_timeout_s:g} s"
           if reason == "header_timeout" else "connection closed to make room (server at its "
           f"maximum of {limits.max_connections} connections)")
    return raw_json_response(408, "Request Timeout", reason, msg)


def protocol_class(limits: ConnectionLimits, on_close=None) -> type:
    """A uvicorn HTTP protocol class enforcing ``limits``; ``on_close(reason)`` counts closes we force."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    shared = _Shared(limits, on_close)

    class GuardedH11Protocol(H11Protocol):
        shared_state = shared

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # headers and body of a response go out at once (see serve/app.py bind_socket)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._header_timer = None
            self._got_bytes = False
            if len(self.connections) > limits.max_connections and not shared.evict_oldest_waiting(self):
                shared.on_close("over_capacity")
                transport.write(_over_capacity_response(limits))
                transport.close()
                return
            self._await_headers()

        # -- header timeout ----------------------------------------------------------------------
        def _await_headers(self) -> None:
            self._got_bytes = False
            shared.waiting.pop(self, None)
            shared.waiting[self] = None
            self._cancel_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _cancel_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_done(self) -> None:
            shared.waiting.pop(self, None)
            self._cancel_timer()

        def _header_timeout(self) -> None:
            self._header_timer = None
            self.drop("header_timeout")

        def drop(self, reason: str) -> None:
            """Close a connection that is waiting for headers (timeout or displaced at the cap)."""
            self._headers_done()
            if self.transport.is_closing():
                return
            shared.on_close(reason)
            if self._got_bytes:  # it was sending a request: say why it is cut off
                self.transport.write(_dropped_response(limits, reason))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self in shared.waiting:
                self._got_bytes = True
            super().data_received(data)
            if self in shared.waiting and self.conn.their_state is not h11.IDLE:
                self._headers_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()  # keep-alive: the next request's headers have the same budget

        def connection_lost(self, exc) -> None:
            self._headers_done()
            super().connection_lost(exc)

        # -- malformed HTTP gets the JSON error body -----------------------------------------------
        def send_400_response(self, msg: str) -> None:
            self._headers_done()
            shared.on_close("malformed_http")
            self.transport.write(raw_json_response(400, "Bad Request", "malformed_http",
                                                   "malformed HTTP request line or headers"))
            self.transport.close()

    return GuardedH11Protocol
