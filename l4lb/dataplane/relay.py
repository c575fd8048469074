"""The relay: a pair of protocols, one on the client's socket, one on the backend's (native
classes when compiled: they subclass nothing, and uvloop duck-types a protocol).

Each side writes what it receives straight into the other side's transport; flow control is the
transports' own: when one side's write buffer passes the high-water mark, its `pause_writing`
pauses reading on the other side, and `resume_writing` resumes it below the low-water mark.
Memory per connection is therefore bounded by two write buffers plus one read chunk each way,
whatever the peers do. The limits are set explicitly: uvloop's default low-water mark is 16
bytes, which makes a paused relay stall stop-and-go.

Both sides buffer what arrives until they are paired; the client's side stops reading (`held`)
once that buffer passes the high-water mark, so it is one write buffer and a read chunk at most.
The usual first request is well under it: no pause and resume (two epoll changes) per
connection. A FIN from one side is passed on as `write_eof()` while the other direction
keeps flowing; once both sides have sent FIN, both transports close. A reset or error on one side
resets the other (SO_LINGER 0, then abort), so the far end learns of it as it would without us.

With `relay: auto` or `splice`, a paired connection can move to the zero-copy relay of
`splice.py` (see `ClientSide.begin_splice`); the transports then sit idle until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, cast

from ..core import proxyproto
from ..core.connection import CLOSING, ENDED, HALF_CLOSED, PAIRED, Conn, unrouted
from ..core.routing import Router
from ..core.throttle import Throttle, held_note
from . import splice
from .dialer import Dial, Stepper
from .path import NO_BACKEND, REACHED, admit, connect, open_route, warn
from .splice import SpliceSession

if TYPE_CHECKING:
    from .context import DataPlane
    from .dialer import Cancellable

log = logging.getLogger("l4lb.relay")

_throttle = Throttle()
_NEVER = float("inf")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


def reset(transport: asyncio.Transport) -> None:
    """Close with an RST rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, splice.LINGER_RESET)
    transport.abort()


def peer_of(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The peer's (host, port): IPv6's (host, port, flowinfo, scope_id) cut to two (a
    link-local host keeps its "%scope" in the host)."""
    peer = transport.get_extra_info("peername")
    return None if peer is None else (peer[0], peer[1])


class Half:
    """One socket of a relayed connection."""

    __slots__ = (
        "eof",
        "held",
        "lost",
        "owner",
        "peer",
        "pending",
        "seen",
        "splice_at",
        "transport",
    )
    transport: asyncio.Transport
    owner: ClientSide

    def __init__(self) -> None:
        self.splice_at = _NEVER  # bytes after which this connection moves to splice (relay: auto)
        self.peer: Half | None = None
        self.pending: list[bytes] | None = None  # bytes that arrived before pairing
        self.eof = False  # this side has sent its FIN
        self.held = False  # reading paused until paired: the buffer before pairing is full
        self.lost = False
        self.seen = False  # traffic since the idle sweeper last looked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.transport = t

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        conn = owner.conn  # (the bytes are counted in the connection's record as they pass)
        if self is owner:
            conn.bytes_in += len(data)
            total = conn.bytes_in
        else:
            conn.bytes_out += len(data)
            total = conn.bytes_out
        self.seen = True
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            if total >= self.splice_at:
                owner.begin_splice()
        elif self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)
            if total > HIGH_WATER and not self.held:
                self.held = True  # (resumed by `pair`)
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.eof:  # (adopted after its FIN: an upgrade's new process reads it again)
            return True
        self.eof = True
        conn = self.owner.conn
        if not conn.termination:  # (inline: once per side and connection)
            conn.termination = "client_fin" if self is self.owner else "backend_fin"
        peer = self.peer
        if peer is not None and not peer.lost:
            if peer.eof:  # both directions are finished
                conn.phase = CLOSING
                self.transport.close()
                peer.transport.close()
            else:
                conn.phase = HALF_CLOSED
                peer.transport.write_eof()
        return True  # keep the other direction flowing

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.eof:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.owner.switching:
            self.owner.check_switch()
            return
        peer = self.peer
        if peer is not None and not peer.eof:
            peer.transport.resume_reading()

    def _pass_on_loss(self, exc: Exception | None) -> None:
        self.lost = True
        conn = self.owner.conn
        if not conn.termination:
            client = self is self.owner
            if exc is not None:
                conn.termination = "client_rst" if client else "backend_rst"
            else:
                conn.termination = "client_close" if client else "backend_close"
        if conn.phase < CLOSING:
            conn.phase = CLOSING
        peer = self.peer
        if peer is not None and not peer.lost:
            if exc is None:
                peer.transport.close()
            else:
                reset(peer.transport)


def pair(a: ClientSide, b: BackendSide) -> None:
    """Join the client's half and the backend's: resume reading the client if its buffer held it
    (the backend's is paired in the same turn of the loop as its connect, so it holds one read
    at most), then hand over what each buffered (in that order, so a flush that fills a write
    buffer pauses the reader it should)."""
    a.peer, b.peer = b, a
    a.conn.phase = PAIRED
    if a.held:
        a.held = False
        if not a.eof:
            a.transport.resume_reading()
    for src, dst in ((a, b), (b, a)):
        if src.pending:
            for chunk in src.pending:
                dst.transport.write(chunk)
            src.pending = None
        if src.eof:
            if dst.eof:
                a.conn.phase = CLOSING
                a.transport.close()
                b.transport.close()
                return
            a.conn.phase = HALF_CLOSED
            dst.transport.write_eof()


class BackendSide(Half):
    __slots__ = ("client", "local")

    def __init__(self, client: ClientSide) -> None:
        super().__init__()
        self.client = client
        self.owner = client
        self.local: tuple[str, int] | None = None  # our end of a dial that could loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # (not paused: see `pair`)
        self.transport = t
        client = self.client
        earlier = client.dialed
        if earlier is not None and earlier.peer is None:
            # A connect that completed in the very turn its deadline passed was taken for a
            # timeout, and the dial moved on: that socket is nobody's.
            earlier.discard()
        client.dialed = self  # so that a dial cancelled from here on closes this socket
        route = client.conn.route
        if route is not None and route.backend is not None and route.backend.may_loop:
            plane = client.plane
            self.local = local = transport.get_extra_info("sockname")[:2]
            plane.outgoing[local] = (client.router, route.backend)
            inner = plane.inbound.get(local)  # accepted before this callback ran
            if inner is not None:
                inner.looped(local)

    def discard(self) -> None:
        """Close a socket the dial made but no longer wants. Its `connection_lost` may never
        come: uvloop closes the transport of a connect whose wait was cancelled after its
        connection_made was scheduled without calling connection_lost (seen when a dial
        started in the accept's own turn, `Stepper`), so the loop guard's entry goes here."""
        self.transport.close()
        if self.local is not None:
            self.client.plane.outgoing.pop(self.local, None)
            self.local = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.local is not None:
            self.client.plane.outgoing.pop(self.local, None)
        self._pass_on_loss(exc)
        if self.client.lost:
            self.client.finish()


class ClientSide(Half):
    """The accepted socket; owns the connection's record (`conn`: its route, counters, times,
    phase) and its dial."""

    __slots__ = (
        "conn",
        "dialed",
        "idle_since",
        "inbound",
        "plane",
        "proxy_buf",
        "proxy_timer",
        "router",
        "source",
        "splice",
        "switching",
        "task",
    )

    def __init__(self, plane: DataPlane, router: Router, service_port: int) -> None:
        super().__init__()
        self.owner = self
        self.conn = Conn(None, 0.0, service_port)
        self.switching = False
        self.splice: SpliceSession | None = None
        self.plane = plane
        self.router = router
        self.task: Cancellable | None = None  # the dial: a Stepper, a Task with a store
        self.dialed: BackendSide | None = None  # the last backend socket the dial opened
        self.idle_since = 0.0
        self.proxy_buf: bytes | None = None
        self.proxy_timer: asyncio.TimerHandle | None = None
        self.inbound: tuple[str, int] | None = None  # the peer, while in `plane.inbound`
        self.source: str | None = None  # the address to dial from (group `source`), if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.accepted(transport)
        if self.plane.loop_watch and peer is not None and self.from_ourselves(peer):
            return
        self._start(peer)

    def accepted(self, transport: asyncio.BaseTransport) -> tuple[str, int] | None:
        """Take the accepted socket: its peer, and the time, into the record."""
        Half.connection_made(self, transport)
        conn = self.conn
        conn.peer = peer = peer_of(transport)
        conn.started = self.plane.loop_time()
        return peer

    def log_line(self, now: float, end: bool = True) -> None:
        """Hand this connection's line to its group's connection log at loop time `now`: when
        l4lb refuses it before routing, or (`end` false) when it is established. (A routed
        connection's last line comes from `Router.end`.)"""
        sink = self.router.log
        if sink is None:
            return
        conn = self.conn
        if conn.routed is None:  # refused before any dial, or while it went on
            route = conn.route
            tries = len(route.tried) if route is not None else 0
            conn.routed = unrouted(self.router.name, conn.port, tries)
        sink.log(conn, now, end=end)

    def ended(self, how: str) -> None:
        """l4lb itself ends the connection (a refusal, the idle timeout, shutdown): say why."""
        conn = self.conn
        conn.end(how)
        if conn.phase < CLOSING:
            conn.phase = CLOSING

    def from_ourselves(self, peer: tuple[str, int]) -> bool:
        """While some backend could lead back to us (`DataPlane.loop_watch`), a client may be
        l4lb itself: refused if it is one of our open dials, else remembered so that a dial
        completing just after this accept can tell (`BackendSide`)."""
        where = (peer[0].removeprefix("::ffff:"), peer[1])
        if where in self.plane.outgoing:
            self.looped(where)
            return True
        self.inbound = where
        self.plane.inbound[where] = self
        return False

    def looped(self, where: tuple[str, int]) -> None:
        """Refuse (counted) a connection from l4lb's own dial, and take the backend that
        brought it down, so that no further dial repeats the loop until the descriptors run
        out (its checks bring it back, and one loop takes it down again)."""
        plane = self.plane
        plane.loops += 1
        self.reject(
            f"a connection from l4lb's own outgoing socket {where[0]}:{where[1]}"
            " (a backend points at a listener of l4lb)"
        )
        router, backend = plane.outgoing.get(where, (None, None))
        if router is not None and backend is not None and backend is not router.sorry:
            router.set_health(backend, False, "it leads back to l4lb itself")

    def _start(self, client: tuple[str, int] | None, screen: bool = True) -> None:
        """Admit the client (path.admit), take its route, and dial (`screen` False: a trusted
        proxy's own connection, a PROXY LOCAL or UNKNOWN header, which the access lists do
        not judge)."""
        router = self.router
        plane = self.plane
        host = client[0] if client is not None else ""
        refusal = admit(plane, router, self.conn, host, screen=screen)
        if refusal:
            self.refuse(refusal)
            return
        source = router.spec.source
        if source is not None:  # (the client's own address, or a fixed one)
            self.source = host if source == "client" else source
        open_route(router, self.conn)
        plane.track(self)
        if plane.store is None:
            stepper = Stepper()
            self.task = stepper
            stepper.start(self._connect())
        else:  # (the store's calls use asyncio.timeout, which needs a Task)
            self.task = plane.loop.create_task(self._connect())

    def refuse(self, how: str) -> None:
        """Reset a client that gets no backend at all, and log its line."""
        self.ended(how)
        self.conn.phase = ENDED
        reset(self.transport)
        self.log_line(self.plane.loop_time())

    def reject(self, why: str) -> None:
        """Refuse the client with a reset before any byte of it reaches a backend (a PROXY
        header it may not send, a loop); counted, and logged at most once a second."""
        self.router.stats.rejected += 1
        warn("rejected", self.router, f"rejected a client: {why}")
        self.refuse("rejected")

    async def _connect(self) -> None:
        router = self.router
        source = self.source
        step = Dial(
            self.plane.loop,
            BackendSide,
            self,
            timeout=router.spec.connect_timeout,
            source=source,
            transparent=source is not None and router.spec.source == "client",
        )
        try:
            result = await connect(self.plane, router, self.conn, step, wait=True, task=self.task)
        except asyncio.CancelledError:  # the client left while we dialed
            dialed = self.dialed
            if dialed is not None and dialed.peer is None:
                dialed.discard()  # connected just as the client left: not to be leaked
            self.finish()
            raise
        except Exception:
            log.exception("group %s: dial failed unexpectedly", router.name)
            result = NO_BACKEND
        backend_side = self.dialed  # (the dial's protocol registered itself: `BackendSide`)
        if result != REACHED or backend_side is None:
            self._unreached(result)
            return
        self.task = None  # a finished task holds its result and frame: 1 KiB an idle connection
        self.dialed = None
        self._paired(backend_side)

    def _unreached(self, result: str) -> None:
        """No backend was reached: the client is closed, its line logged, its pin as it was."""
        dialed = self.dialed
        if dialed is not None and dialed.peer is None:
            dialed.discard()  # (connected in the turn its deadline passed)
            self.dialed = None
        router = self.router
        if result == NO_BACKEND:
            warn(
                "no backend",
                router,
                f"no backend accepted a connection on port {self.conn.port}; closing it",
            )
        self.ended(result)
        self.transport.close()
        router.end(self.conn, now=self.plane.loop_time(), given_up=True)
        self.plane.forget(self)

    def _paired(self, backend_side: BackendSide) -> None:
        """The dial reached a backend: its PROXY header if it takes one, then the two sides
        joined, and the relay mode chosen."""
        router = self.router
        conn = self.conn
        if router.log_on_connect:
            self.log_line(conn.connected_at, end=False)
        backend = conn.backend
        assert backend is not None
        mode = backend.send_proxy or router.spec.send_proxy
        if mode is not None and mode != "none":
            dest = self.transport.get_extra_info("sockname")
            client = conn.via or self.transport.get_extra_info("peername")
            backend_side.transport.write(proxyproto.encode(mode, client[:2], dest[:2]))
        pair(self, backend_side)
        relay = router.spec.relay
        if relay == "splice" and splice.AVAILABLE:
            self.begin_splice()
        elif relay == "auto" and splice.AVAILABLE:
            self.splice_at = backend_side.splice_at = float(splice.SPLICE_AFTER)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inbound is not None:
            self.plane.inbound.pop(self.inbound, None)
        self._pass_on_loss(exc)
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # its CancelledError handler finishes
        elif self.peer is None or self.peer.lost:
            self.finish()

    def finish(self) -> None:
        conn = self.conn
        route = conn.route
        if route is None:
            return
        backend = route.backend
        plane = self.plane
        self.router.end(conn, now=plane.loop_time())
        if backend is not None and backend.waiting:
            plane.slots.wake(backend)
        plane.forget(self)

    # ------------------------------------------------------------------ zero copy

    def begin_splice(self) -> None:
        """Move this connection to the splice relay (see splice.py): stop reading both sides,
        and switch once both write buffers are empty."""
        peer = self.peer
        self.splice_at = _NEVER
        if peer is not None:
            peer.splice_at = _NEVER
        if self.switching or self.splice is not None or peer is None:
            return
        if self.eof or peer.eof or self.lost or peer.lost:
            return  # a half-closed connection stays on the copy relay
        self.switching = True
        for t in (self.transport, peer.transport):
            t.pause_reading()
            t.set_write_buffer_limits(0, 0)  # resume_writing then means "flushed"
        self.check_switch()

    def check_switch(self) -> None:
        peer = self.peer
        if peer is None or self.lost or peer.lost:
            self.switching = False
            return
        if self.transport.get_write_buffer_size() or peer.transport.get_write_buffer_size():
            return  # resume_writing calls again when flushed
        self.switching = False
        fds = [t.get_extra_info("socket") for t in (self.transport, peer.transport)]
        if any(f is None for f in fds):
            return

        conn = self.conn

        def count_up(n: int) -> None:
            conn.bytes_in += n
            self.seen = True

        def count_down(n: int) -> None:
            conn.bytes_out += n
            peer.seen = True

        self.splice = SpliceSession(
            asyncio.get_running_loop(),
            fds[0].fileno(),
            fds[1].fileno(),
            (count_up, count_down),
            self._splice_ended,
        )
        self.splice.start()

    def _splice_ended(self, reset_: bool) -> None:
        # (the pumps do not say which side ended first)
        self.ended("splice_rst" if reset_ else "splice_fin")
        peer = self.peer
        for t in (self.transport, peer.transport if peer is not None else None):
            if t is None or t.is_closing():
                continue
            if reset_:
                t.abort()  # the sockets carry SO_LINGER 0 by now: this sends the RST
            else:
                t.close()

    def reset_all(self) -> None:
        """Reset both sides (shutdown after the grace period)."""
        self.ended("shutdown")
        if self.splice is not None:
            self.splice.abort()
            return
        if not self.lost:
            reset(self.transport)
        if self.peer is not None and not self.peer.lost:
            reset(self.peer.transport)

    def close(self) -> None:
        """Close both sides with a FIN (idle timeout, on_down: close)."""
        if self.splice is not None:
            self.splice.close()
            return
        self.transport.close()
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.close()


class ProxyClientSide(ClientSide):
    """A client of a group with `accept_proxy`: from a trusted peer, a PROXY header must come
    first (within the timeout), and its source address is the client. `proxy_buf` is not None
    while the header is awaited; after it, every callback is ClientSide's. (The class cannot
    simply be switched: uvloop keeps the protocol's bound methods from connection_made on.)"""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.accepted(transport)
        if self.plane.loop_watch and peer is not None and self.from_ourselves(peer):
            return
        trusted = self.router.proxy_trusted
        spec = self.router.spec.accept_proxy
        if peer is None or trusted is None or spec is None or not trusted(peer[0]):
            self.reject(f"a PROXY header from an untrusted address {peer!r}")
            return
        self.proxy_buf = b""
        self.proxy_timer = asyncio.get_running_loop().call_later(spec.timeout, self._late)

    def _late(self) -> None:
        self.reject("no complete PROXY header in time")

    def data_received(self, data: bytes) -> None:
        if self.proxy_buf is None:
            ClientSide.data_received(self, data)
            return
        buf = self.proxy_buf + data
        try:
            header = proxyproto.parse(buf)
        except proxyproto.ProxyError as exc:
            self.reject(str(exc))
            return
        if header is None:
            if len(buf) > proxyproto.MAX_HEADER:
                self.reject("a PROXY header too long")
                return
            self.proxy_buf = buf
            return
        if self.proxy_timer is not None:
            self.proxy_timer.cancel()
        self.proxy_buf = None
        rest = buf[header.length :]
        if rest:
            self.pending = [rest]
            self.conn.bytes_in += len(rest)
        self.conn.via = header.source
        if header.source is None:  # LOCAL (a health check of the proxy's) or UNKNOWN: the
            # proxy speaks for itself, and it is trusted; allow and deny name clients
            self._start(peer_of(self.transport), screen=False)
        else:
            self._start(header.source)

    def eof_received(self) -> bool:
        if self.proxy_buf is None:
            return ClientSide.eof_received(self)
        self.reject("the peer closed before its PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proxy_buf is None and self.conn.route is not None:
            ClientSide.connection_lost(self, exc)
            return
        if self.inbound is not None:
            self.plane.inbound.pop(self.inbound, None)
        self.lost = True
        if self.proxy_timer is not None:
            self.proxy_timer.cancel()
        conn = self.conn
        if not conn.termination:  # gone before its header: not refused
            conn.end("client_rst" if exc is not None else "client_close")
            conn.phase = ENDED
            self.log_line(self.plane.loop_time())


class AdoptedClientSide(ClientSide):
    """The client side of a connection an upgrade handed over (`transfer.adopt_conn`): its
    socket is taken, never admitted or dialed again. Every later callback is ClientSide's."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Half.connection_made(self, transport)


class AdoptedBackendSide(BackendSide):
    """The backend side of a connection an upgrade handed over: paired by the adoption."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Half.connection_made(self, transport)
        client = self.client
        backend = client.conn.backend
        if backend is not None and backend.may_loop:  # (the loop guard knows its dials)
            self.local = local = transport.get_extra_info("sockname")[:2]
            client.plane.outgoing[local] = (client.router, backend)


SO_ORIGINAL_DST = 80  # netfilter's, for IPv4 (SOL_IP) and IPv6 (SOL_IPV6) alike


def original_port(sock: socket.socket, fallback: int) -> int:
    """The port the client dialled before iptables/nft REDIRECT sent it here."""
    for level, size in ((socket.SOL_IP, 16), (socket.IPPROTO_IPV6, 28)):
        try:
            raw = sock.getsockopt(level, SO_ORIGINAL_DST, size)
        except OSError:
            continue
        return int.from_bytes(raw[2:4], "big")
    return fallback


class MarkedClientSide(ClientSide):
    """A connection on the kernel_marks listener: its firewall mark (SO_MARK, inherited from the
    SYN with net.ipv4.tcp_fwmark_accept=1) picks the group, and the port it was redirected from
    is the service port. Then it is a plain ClientSide."""

    __slots__ = ()

    def __init__(self, plane: DataPlane) -> None:
        placeholder = next(iter(plane.by_mark.values()), None) or next(iter(plane.routers.values()))
        super().__init__(plane, placeholder, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.accepted(transport)
        sock = transport.get_extra_info("socket")
        mark = 0
        if sock is not None:
            with contextlib.suppress(OSError):
                mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        if self.plane.loop_watch and peer is not None and self.from_ourselves(peer):
            return  # a REDIRECT rule that sends l4lb's own dials back to it
        router = self.plane.by_mark.get(mark)
        if router is None or sock is None:
            self.plane.unmatched_marks += 1
            held = _throttle.allow(("mark", mark))
            if held is not None:
                log.warning(
                    "a connection with firewall mark %d, which no group claims%s",
                    mark,
                    held_note(held),
                )
            reset(self.transport)
            return
        self.router = router
        self.conn.port = original_port(sock, transport.get_extra_info("sockname")[1])
        self._start(peer)
