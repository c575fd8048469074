"""The admin listener's defences below the API: what an unauthenticated peer can do to it.

aiohttp parses HTTP; this module bounds what a peer may cost before a request reaches a
handler, and keeps the log readable whatever it sends:

- at most `max_connections` connections at once, and `max_connections_per_peer` from one
  address, so that one peer holding slow connections cannot shut another out (its `/healthz`,
  Docker's HEALTHCHECK, say); more are answered 503 and closed, counted;
- a request's head must arrive within `request_timeout` of the connection opening (a client
  that sends half a header is closed then, counted as `header_timeout`), and an idle keep-alive
  connection is closed after the same time;
- a malformed request (bad version, a header line too long, too many headers, a bad
  Content-Length, bad chunking...) gets aiohttp's 400 and, instead of aiohttp's traceback, one
  line per kind of problem and second, counted in `refused[reason]`.

An error that is not the peer's fault (a handler's bug) still logs its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ..core.throttle import Throttle, held_note

log = logging.getLogger("l4lb.admin")

MAX_BODY = 64 * 1024
MAX_HEADERS = 64
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HEALTHY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n"
    b'Connection: close\r\n\r\n{"status": "ok"}'
)
BUSY_READ = 1.0  # seconds a connection over the limit has to send its request line
BUSY_HEAD = 512  # bytes of it read at most
BUSY_HELD = 64  # such connections held at once for their request line; more are answered 503


def reason_of(exc: BaseException) -> str:
    """The `reason` label of a request aiohttp could not parse."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "header_too_long"
    if isinstance(exc, http_exceptions.TransferEncodingError):
        return "bad_chunking"
    if isinstance(exc, http_exceptions.ContentLengthError):
        return "bad_content_length"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "bad_method"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "bad_url"
    text = str(exc).lower()
    for needle, reason in (
        ("too many headers", "too_many_headers"),
        ("content-length", "bad_content_length"),
        ("chunk", "bad_chunking"),
        ("version", "bad_version"),
        ("header", "bad_header"),
    ):
        if needle in text:
            return reason
    if isinstance(exc, http_exceptions.BadStatusLine):
        return "bad_request_line"
    return "malformed"


class _ParseErrors(logging.Logger):
    """aiohttp's server logger: parse errors become one counted, throttled line each."""

    def __init__(self, count: Callable[[str], None]) -> None:
        super().__init__("l4lb.admin.http")
        self.parent = log
        self._count = count
        self._throttle = Throttle()

    def _peer_error(self, msg: object, args: tuple[object, ...], exc_info: Any) -> bool:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError):  # the client left before its answer: counted
            self._count("client_gone")
            return True
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return False
        reason = reason_of(exc)
        self._count(reason)
        held = self._throttle.allow(reason)
        if held is not None:
            peer = args[0] if args else "?"
            what = " ".join(str(getattr(exc, "message", "") or exc).split())[:200]
            log.warning(
                "refused a malformed admin request from %s (%s): %s%s",
                peer,
                reason,
                what,
                held_note(held),
            )
        return True

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if not self._peer_error(msg, args, exc_info):
            log.error(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: object, **kw: Any) -> None:
        exc_info = kw.pop("exc_info", None)
        if exc_info is None or not self._peer_error(msg, args, exc_info):
            log.debug(msg, *args, exc_info=exc_info, **kw)


def runner_options(count: Callable[[str], None], timeout: float) -> dict[str, Any]:
    """Keyword arguments for `web.AppRunner` that bound a request's head and quiet the log."""
    return {
        "access_log": None,
        "keepalive_timeout": timeout,
        # After an error answer (a 413, say), aiohttp reads what the client still sends, so the
        # client sees the answer rather than a reset; for a second, not its default ten, since
        # each such connection counts against the limit meanwhile.
        "lingering_time": 1.0,
        "logger": _ParseErrors(count),
        "max_headers": MAX_HEADERS,
    }


class _Busy(asyncio.Protocol):
    """Answers a connection over a limit: 503, except a liveness probe (`GET /healthz`), which
    gets its 200 (an orchestrator must not restart l4lb because its admin API is busy). Only
    the request line is read, a few hundred bytes within a second at most."""

    def __init__(self, held: list[int]) -> None:
        self.held = held  # the guard's count of them, shared: a flood is answered at once
        self.transport: Any = None
        self.head = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.held[0] >= BUSY_HELD:  # (so that refusals never hold descriptors unbounded)
            self._answer()
            return
        self.held[0] += 1
        self.timer = asyncio.get_running_loop().call_later(BUSY_READ, self._answer)

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\n" in self.head or len(self.head) >= BUSY_HEAD:
            self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.held[0] -= 1

    def _answer(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        line = self.head.split(b"\r\n", 1)[0].split(b" ")
        probe = len(line) == 3 and line[0] in (b"GET", b"HEAD") and line[1] == b"/healthz"
        t.write(HEALTHY if probe else BUSY)
        t.close()


class _PerPeer(asyncio.Protocol):
    """aiohttp's handler for one connection, counted against its peer address's share: the
    peer is known only once the connection is made, after the factory ran."""

    __slots__ = ("busy", "guard", "host", "inner")

    def __init__(self, guard: Guard, inner: RequestHandler) -> None:
        self.guard = guard
        self.inner: RequestHandler | None = inner
        self.host: str | None = None  # counted under this address
        self.busy: _Busy | None = None  # over its peer's share: answered as busy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self.inner is not None
        guard = self.guard
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""  # "": a Unix socket
        n = guard.peers.get(host, 0)
        if host and n >= guard.per_peer:
            guard.refuse(
                "too_many_from_peer",
                "admin listener: %d connections open from %s, refusing more from it",
                n,
                host,
            )
            self.inner = None
            self.busy = _Busy(guard.busy_held)
            self.busy.connection_made(transport)
            return
        guard.peers[host] = n + 1
        self.host = host
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        host = self.host
        if host is not None:
            self.host = None
            left = self.guard.peers[host] - 1
            if left:
                self.guard.peers[host] = left
            else:
                del self.guard.peers[host]
        if self.inner is not None:
            self.inner.connection_lost(exc)
        elif self.busy is not None:
            self.busy.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        elif self.busy is not None:
            self.busy.data_received(data)

    def eof_received(self) -> None:
        if self.inner is not None:
            self.inner.eof_received()
        elif self.busy is not None:
            self.busy.eof_received()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class Guard:
    """The protocol factory of the admin listener, around aiohttp's: the connection limits and
    the deadline of the first request's head. `served` is told of each request by the API's
    middleware (`request.protocol`)."""

    def __init__(
        self,
        server: web.Server,
        count: Callable[[str], None],
        timeout: float,
        limit: int,
        per_peer: int,
    ) -> None:
        self.server = server
        self.count = count
        self.timeout = timeout
        self.limit = limit
        self.per_peer = per_peer
        self.peers: dict[str, int] = {}  # connections open by peer address
        self.busy_held = [0]  # connections over a limit, held for their request line
        # Connections that have sent a request, until their deadline passes (each has one, so
        # the set holds at most the connections of the last `timeout` seconds).
        self.served: set[object] = set()
        self._throttle = Throttle()

    def refuse(self, reason: str, message: str, *args: object) -> None:
        """Count a refusal; log it at most once a second per reason."""
        self.count(reason)
        held = self._throttle.allow(reason)
        if held is not None:
            log.warning(message + "%s", *args, held_note(held))

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            self.refuse(
                "too_many_connections",
                "admin listener: %d connections open, refusing more",
                self.limit,
            )
            return _Busy(self.busy_held)
        handler = self.server()
        asyncio.get_running_loop().call_later(self.timeout, self._deadline, handler)
        return _PerPeer(self, handler)

    def _deadline(self, handler: RequestHandler) -> None:
        if handler in self.served:
            self.served.discard(handler)
            return
        if handler.transport is None or handler.transport.is_closing():
            return
        self.refuse(
            "header_timeout",
            "closed an admin connection from %s that sent no complete request in %gs",
            handler.peername,
            self.timeout,
        )
        handler.force_close()
