"""Handing open connections and flows to another process (an upgrade): freezing them in the
process that gives them (`Freezer`), each written as a record and its descriptors (`export_conn`,
`export_flow`), and adopting them in the process that takes them (`adopt_conn`, `adopt_flow`).

Theory of operation
-------------------
A relayed TCP connection is two sockets and what l4lb holds between them: the bytes one side
sent that the other's transport has not written yet, and for a spliced connection, the bytes in
its pipes. A socket's own kernel buffers move with its descriptor (`SCM_RIGHTS` passes a
reference to the same open socket), so what must travel is what l4lb holds in memory:

1. `Freezer.freeze` first waits, stopping nothing, for every connection still dialing,
   awaiting its PROXY header or closing to come to a pair or an end (the listeners stopped,
   none comes anew; the paired ones relay on meanwhile, so that a slow dial does not stall
   them). Then it stops every connection reading (both sides, but a side that sent its FIN)
   and waits for the transports to flush what they hold (their write buffers polled); a
   spliced connection's pumps stop reading and pass on what their pipes hold. Nothing is
   taken from a client meanwhile: its bytes wait in the kernel's buffers, as a new client's
   SYN waits in the listener's backlog.
2. Once every write buffer and pipe is empty (within the deadline: a peer that takes nothing
   for that long fails the upgrade, which then changes nothing), each connection is a record
   (`export_conn`: its `Conn`, which sides sent their FIN; the format carries held bytes too,
   empty while l4lb flushes first) and its two descriptors; each UDP flow (its listener
   stopped reading too) a record and one descriptor.
3. If the upgrade fails at any point before the new process serves, `Freezer.thaw` undoes 1:
   the connections read again, nothing was lost, nothing was cut.
4. The new process adopts each connection (`adopt_conn`): the transports are made on the
   received sockets, the held bytes are written first, the two sides paired as a dial pairs
   them, and the router takes the connection's entry and slot without counting it again
   (`Router.adopt`). The old process then exits without closing anything (its copies of the
   descriptors go with it; no FIN, no reset).
5. In a hand-over in waves (`runtime/handover.py`, format 2), `settle` alone comes first; once
   the new process serves, `freeze_wave` does the second half of 1 for a wave of connections
   while the others relay on, and `release` closes this process's copies of a wave the new
   process has taken (its protocols detached first: no callback runs, nothing is counted or
   logged twice; the new process holds the sockets, so nothing reaches the peers).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.connection import CLOSING, DIALING, ENDED, HALF_CLOSED, PAIRED, Conn, Routed
from ..core.routing import Router
from .context import DataPlane
from .dialer import as_factory
from .relay import AdoptedBackendSide, AdoptedClientSide, ClientSide, Half
from .udp import Flow, UdpListener

log = logging.getLogger("l4lb.upgrade")
POLL = 0.005  # seconds between looks at the connections while they flush


class FreezeError(Exception):
    """The connections could not all be frozen in time; the message says how many and why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Freezer:
    """The freeze of one process's connections and flows, and its undoing."""

    def __init__(self, plane: DataPlane, udp: list[UdpListener]) -> None:
        self.plane = plane
        self.udp = udp
        self.frozen: list[ClientSide] = []
        self.spliced: list[ClientSide] = []
        self.stopped_udp = False

    async def freeze(self, deadline: float) -> list[ClientSide]:
        """Freeze every connection and flow (see the theory above) within `deadline` seconds;
        the connections to hand over. FreezeError when some could not be flushed in time."""
        end = self.plane.loop.time() + deadline
        await self._settle(end, deadline)
        self.stop_udp()
        todo = [c for c in self.plane.live if isinstance(c, ClientSide)]
        return await self._stop_and_flush(todo, end, deadline, late=True)

    async def settle(self, deadline: float) -> None:
        """The first half of `freeze` alone: the dials done, nothing stopped (for a hand-over
        in waves, `freeze_wave` then stops a few connections at a time)."""
        await self._settle(self.plane.loop.time() + deadline, deadline)

    def stop_udp(self) -> None:
        """Every UDP listener, so every flow, stops reading (`thaw` resumes them)."""
        for listener in self.udp:
            listener.pause()
        self.stopped_udp = True

    async def freeze_wave(self, conns: list[ClientSide], deadline: float) -> list[ClientSide]:
        """Freeze `conns` alone (the others relay on); those to hand over, as `freeze`."""
        end = self.plane.loop.time() + deadline
        return await self._stop_and_flush(conns, end, deadline, late=False)

    def release(self, conns: list[ClientSide]) -> None:
        """`conns` are the new process's now: this process's copies of their sockets are
        closed (no FIN: the new process holds the sockets; no callback of theirs runs here,
        so nothing is counted or logged twice), and they are forgotten. A spliced one's are
        left for this process's exit."""
        gone = set(conns)
        for cs in conns:
            peer = cs.peer
            if cs.splice is None and peer is not None:
                for half in (cs, peer):
                    half.transport.set_protocol(asyncio.Protocol())
                    half.transport.close()
            self.plane.forget(cs)
        self.frozen = [c for c in self.frozen if c not in gone]
        self.spliced = [c for c in self.spliced if c not in gone]

    async def _stop_and_flush(
        self, todo: list[ClientSide], end: float, deadline: float, *, late: bool
    ) -> list[ClientSide]:
        """Stop `todo` reading and wait until what l4lb holds of theirs is flushed; `late`:
        and any connection that came to the plane meanwhile. Those paired, to hand over."""
        loop = self.plane.loop
        stopped: set[ClientSide] = set()
        seen = set(todo)
        while True:
            waiting: list[ClientSide] = []
            for cs in todo:
                phase = cs.conn.phase
                if phase in (PAIRED, HALF_CLOSED):
                    if cs not in stopped:
                        stopped.add(cs)
                        self._stop(cs)
                    if not self._flushed(cs):
                        waiting.append(cs)
                elif phase != ENDED:
                    waiting.append(cs)  # dialing, awaiting its header, or closing: it comes on
            if not waiting:
                # One accepted in the turn its listener closed comes after the first look
                # (its connection_made was due): it is frozen as the others.
                live = self.plane.live
                more = [c for c in live if isinstance(c, ClientSide) and c not in seen]
                if not late or not more:
                    break
                seen.update(more)
                todo = more
                continue
            if loop.time() >= end:
                raise FreezeError(
                    f"{len(waiting)} connection(s) still dialing, closing or with bytes their"
                    f" peer has not taken after {deadline:g} s"
                )
            todo = waiting  # (one that ended or flushed stays so: it is not looked at again)
            await asyncio.sleep(POLL)
        return [cs for cs in stopped if cs.conn.phase in (PAIRED, HALF_CLOSED)]

    async def _settle(self, end: float, deadline: float) -> None:
        """Wait, stopping nothing, until no connection is dialing, awaiting its PROXY header or
        closing (the listeners stopped, none comes anew): a dial can take a SYN's retry, and
        the connections already paired should not wait for it frozen."""
        loop = self.plane.loop
        settled = (PAIRED, HALF_CLOSED, ENDED)

        def unsettled() -> list[ClientSide]:
            live = self.plane.live
            return [c for c in live if isinstance(c, ClientSide) and c.conn.phase not in settled]

        todo = unsettled()
        while todo:
            while todo:
                if loop.time() >= end:
                    raise FreezeError(
                        f"{len(todo)} connection(s) still dialing, awaiting a PROXY header or"
                        f" closing after {deadline:g} s"
                    )
                await asyncio.sleep(POLL)
                todo = [c for c in todo if c.conn.phase not in settled]
            todo = unsettled()  # (one accepted in the turn its listener closed came later)

    def _stop(self, cs: ClientSide) -> None:
        peer = cs.peer
        assert peer is not None
        session = cs.splice
        if session is not None:
            session.pause()
            self.spliced.append(cs)
            return
        for half in (cs, peer):  # (their write buffers are polled: `_flushed`)
            if not half.eof:
                half.transport.pause_reading()
        self.frozen.append(cs)

    @staticmethod
    def _flushed(cs: ClientSide) -> bool:
        peer = cs.peer
        if cs.splice is not None:
            return cs.splice.flushed()
        if peer is None:
            return True
        return not cs.transport.get_write_buffer_size() and not (
            peer.transport.get_write_buffer_size()
        )

    def thaw(self) -> None:
        """Undo the freeze: every connection and flow reads again, as if nothing happened."""
        for cs in self.frozen:
            peer = cs.peer
            if peer is None or cs.lost or peer.lost:
                continue
            for half in (cs, peer):
                if not half.eof:
                    half.transport.resume_reading()
        for cs in self.spliced:
            if cs.splice is not None:
                cs.splice.resume()
        self.frozen, self.spliced = [], []
        if self.stopped_udp:
            for listener in self.udp:
                listener.resume()
            self.stopped_udp = False


def export_conn(
    cs: ClientSide, held: tuple[bytes, bytes], now: float
) -> tuple[dict[str, Any], list[int]]:
    """`cs` as a record (loop time `now`) and its two descriptors, client's first. `held`: the
    bytes l4lb holds toward the backend and toward the client."""
    conn = cs.conn
    peer = cs.peer
    assert peer is not None and conn.backend is not None
    fds = [_fd(cs.transport), _fd(peer.transport)]
    record = {
        "group": cs.router.name,
        "port": conn.port,
        "peer": list(conn.peer) if conn.peer is not None else None,
        "via": list(conn.via) if conn.via is not None else None,
        "key": conn.key,
        "backend": conn.backend.name,
        "age": max(0.0, now - conn.started),
        "connect": max(0.0, conn.connected_at - conn.started) if conn.connected_at else -1.0,
        "idle": max(0.0, now - cs.idle_since),
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "phase": conn.phase,
        "termination": conn.termination,
        "eof": [cs.eof, peer.eof],
        "to_backend": _b64(held[0]),
        "to_client": _b64(held[1]),
        "routed": _routed(conn.routed),
    }
    return record, fds


def _fd(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise FreezeError("a transport without its socket")
    return int(sock.fileno())


def _routed(routed: Routed | None) -> list[Any] | None:
    if routed is None:
        return None
    return [routed.affinity, routed.reason, routed.backend_port, routed.tries]


async def adopt_conn(
    plane: DataPlane,
    router: Router,
    record: dict[str, Any],
    socks: tuple[socket.socket, socket.socket],
) -> ClientSide:
    """A connection the previous process handed over (a checked record, see `handform.py`):
    its transports made on `socks`, the bytes it held written first, its two sides paired."""
    loop = plane.loop
    cs = AdoptedClientSide(plane, router, record["port"])
    conn = cs.conn
    now = loop.time()
    conn.backend = router.by_name[record["backend"]]
    _fill(conn, record, now)
    conn.route = router.adopt(conn.key, conn.backend)
    bs = AdoptedBackendSide(cs)
    conn.phase = record["phase"]
    # A side whose FIN was passed on already is not passed on again (`eof_received` returns
    # at once for it, should its transport read the FIN again).
    passed = record["eof"]
    cs.eof, bs.eof = passed
    # Each transport reads from its making on (uvloop starts reading after connection_made,
    # whatever it did), and the awaits let the loop poll: what a side reads before the two
    # are paired is held (`pending`, `eof`) and passed on below (seen: a backend's FIN read
    # here and never passed on, its client waiting for it across an upgrade).
    await loop.connect_accepted_socket(as_factory(lambda: cs), sock=socks[0])
    await loop.create_connection(as_factory(lambda: bs), sock=socks[1])
    if cs.lost or bs.lost:  # (reset meanwhile: the connection ended as any other)
        for half in (cs, bs):
            if not half.lost:
                half.transport.close()
        return cs
    plane.track(cs)
    cs.idle_since = now - record["idle"]
    cs.peer, bs.peer = bs, cs  # (paired as `relay.pair` does, but for the FINs passed before)
    sides: tuple[tuple[Half, Half, bytes], ...] = (
        (cs, bs, record["to_backend"]),
        (bs, cs, record["to_client"]),
    )
    for src, dst, held in sides:
        if held:  # (what was held goes first, before anything read here)
            dst.transport.write(held)
        if src.pending:
            for chunk in src.pending:
                dst.transport.write(chunk)
            src.pending = None
        if src.held:
            src.held = False
            if not src.eof:
                src.transport.resume_reading()
    for (src, dst, _), was in zip(sides, passed, strict=True):
        if src.eof and not was:  # read here: passed on now
            if dst.eof:
                conn.phase = CLOSING
                cs.transport.close()
                bs.transport.close()
                break
            conn.phase = HALF_CLOSED
            dst.transport.write_eof()
        if src.eof:
            src.transport.pause_reading()
    return cs


ADOPT_AT_ONCE = 512  # connections adopted in one turn of the loop, at most


async def adopt_all(
    plane: DataPlane,
    routers: Mapping[str, Router],
    conns: Sequence[tuple[dict[str, Any], tuple[socket.socket, socket.socket]]],
    what: str,
) -> int:
    """Every connection adopted (`adopt_conn`), `ADOPT_AT_ONCE` a turn; how many could not be
    (a socket the loop refused: closed and said, the rest adopted all the same). `what`: the
    hand-over's kind, for the log."""
    lost = 0

    async def one(record: dict[str, Any], socks: tuple[socket.socket, socket.socket]) -> bool:
        try:
            await adopt_conn(plane, routers[record["group"]], record, socks)
        except OSError as exc:
            log.warning("%s: a connection could not be adopted (closed): %s", what, exc)
            for sock in socks:
                sock.close()
            return False
        return True

    for i in range(0, len(conns), ADOPT_AT_ONCE):  # (many per turn of the loop)
        done = await asyncio.gather(*(one(r, s) for r, s in conns[i : i + ADOPT_AT_ONCE]))
        lost += done.count(False)
    return lost


def _fill(conn: Conn, record: dict[str, Any], now: float) -> None:
    conn.peer = record["peer"][:2] if record["peer"] is not None else None
    conn.via = record["via"][:2] if record["via"] is not None else None
    conn.key = record["key"]
    conn.started = now - record["age"]
    conn.connected_at = conn.started + record["connect"] if record["connect"] >= 0 else 0.0
    conn.bytes_in = record["bytes_in"]
    conn.bytes_out = record["bytes_out"]
    conn.termination = record["termination"]
    conn.phase = DIALING
    routed = record["routed"]
    backend = conn.backend
    if routed is not None:
        affinity, reason, backend_port, tries = routed
        conn.routed = Routed(
            record["group"],
            conn.port,
            affinity,
            reason,
            record["backend"],
            backend.address if backend is not None else "",
            backend_port,
            tries,
            conn.udp,
        )


def export_flow(listener: UdpListener, flow: Flow, now: float) -> tuple[dict[str, Any], list[int]]:
    """`flow` of `listener` as a record (loop time `now`) and its descriptor."""
    sock = flow.sock
    assert sock is not None and flow.backend is not None
    where = flow.where
    dst = (
        where[1]
        if isinstance(where, tuple) and len(where) == 2 and isinstance(where[1], bytes)
        else None
    )
    record = {
        "listener": [listener.spec.host, listener.spec.port],
        "client": list(flow.client),
        "dst": _b64(dst) if dst is not None else None,
        "reply": [flow.reply[0][0], flow.reply[0][1], _b64(flow.reply[0][2])]
        if flow.reply
        else None,
        "key": flow.key,
        "backend": flow.backend.name,
        "age": max(0.0, now - flow.started),
        "idle": max(0.0, listener.now - flow.last),
        "bytes_in": flow.bytes_in,
        "bytes_out": flow.bytes_out,
        "heard": flow.heard,
        "spare": flow.spare,
        "cid": _b64(flow.cid) if flow.cid is not None else None,
        "routed": _routed(flow.routed),
    }
    return record, [sock.fileno()]
