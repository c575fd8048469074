"""Idle connections kept through a crash of the active host (`ha.idle_sync`): the active host
streams to the standby, for every connection that has gone idle, the state `TCP_REPAIR` needs
to make its two sockets again; when the standby takes the addresses without a hand-over (the
active host died), it makes them again and relays on.

Theory of operation
-------------------
Every `SYNC` seconds the active host (`IdleSync.tick`) lists its idle connections: paired, no
FIN either way, nothing held by l4lb, no byte either way for `ha.idle_after` (the idle sweep's
marks). For each one not sent yet at its current byte counts it reads the two sockets' states
without disturbing them (`repair.snapshot`: repair mode for the read alone). It sends the peer
what changed: the new or changed connections (`add`, records as a hand-over's) and the ones no
longer idle or gone (`drop`), with its session id; the peer keeps them (`receive`, each record
checked as a hand-over's) and answers how many it holds; a different count (the peer restarted,
or holds another session's) makes the next tick send everything again. With nothing to send,
the peer is asked its count every `CHECK` seconds all the same (an empty delta).

While idle, a connection's sequence numbers do not move, so the copy stays true; a connection
that moved bytes after the last tick the peer saw is stale there, and lost at a crash (a
restored socket with old sequence numbers cannot talk to its peers): that window is one tick.
At a failover (`restore`) the standby makes each kept connection again (its timestamp clock
moved on by the time since the copy), leaves repair mode at once (it holds the addresses) and
adopts it; the count of those made is `restored`, of those that could not be, `lost`. A client
whose packet reaches the standby in the instant between the addresses arriving and its socket
being made (a tenth of a second at most) meets a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from ..core.connection import PAIRED
from ..dataplane.relay import ClientSide
from ..dataplane.repair import RepairError, TcpState, aged, restore, snapshot, thaw
from ..dataplane.transfer import adopt_conn, export_conn
from .handform import HandoverError, check_conn
from .pair import Pair, PairError, sockets_of
from .pairlink import LinkError

log = logging.getLogger("l4lb.ha")
SYNC = 0.25  # seconds between looks at the idle connections
CHECK = 2.0  # seconds without a change after which the peer is asked its count all the same
MAX_IDLE = 100_000  # connections the standby keeps a copy of
MAX_ID = 200

Kept = tuple[dict[str, Any], TcpState, TcpState, float]  # record, states, when received


class IdleSync:
    """Both halves: the active host's sender, the standby's copies."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.session = secrets.token_hex(8)
        self.sent: dict[str, tuple[int, int]] = {}  # id -> byte counts the peer has
        self.kept: dict[str, Kept] = {}  # the peer's idle connections (on the standby)
        self.kept_session = ""
        self.link_ok = True
        self.last_call = 0.0  # loop time of the last call to the peer

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SYNC)
            try:
                await self.tick()
            except (LinkError, OSError) as exc:  # (said once, until the peer takes them again)
                if self.link_ok:
                    log.warning("ha: idle connections not sent to the peer: %s", exc)
                self.link_ok = False

    def idle_now(self) -> dict[str, ClientSide]:
        pair = self.pair
        plane = pair.host.plane
        now = plane.loop.time()
        out: dict[str, ClientSide] = {}
        for cs in list(plane.live):
            if not isinstance(cs, ClientSide) or cs.conn.phase != PAIRED or cs.splice:
                continue
            peer = cs.peer
            if peer is None or cs.eof or peer.eof or cs.seen or peer.seen:
                continue
            if now - cs.idle_since < pair.spec.idle_after:
                continue
            if cs.transport.get_write_buffer_size() or peer.transport.get_write_buffer_size():
                continue
            ident = _ident(cs)
            if ident is not None:
                out[ident] = cs
        return out

    async def tick(self) -> None:
        pair = self.pair
        if not pair.active or pair.busy:
            self.sent.clear()
            return
        now = pair.host.plane.loop.time()
        current = self.idle_now()
        add: list[dict[str, Any]] = []
        marks: dict[str, tuple[int, int]] = {}
        for ident, cs in current.items():
            mark = (cs.conn.bytes_in, cs.conn.bytes_out)
            if self.sent.get(ident) == mark:
                continue
            record = _record(cs, now)
            if record is None:
                continue
            record["id"] = ident
            add.append(record)
            marks[ident] = mark
        drop = [i for i in self.sent if i not in current]
        if not add and not drop and now - self.last_call < CHECK:
            return
        self.last_call = now
        body = {"session": self.session, "add": add, "drop": drop}
        answer = await pair.link.call("POST", "/api/v1/ha/idle", body, within=5.0)
        self.link_ok = True
        for ident in drop:
            self.sent.pop(ident, None)
        self.sent.update(marks)
        if answer.get("held") != len(self.sent):  # (the peer's copy is not ours: all again)
            self.sent.clear()

    def receive(self, body: dict[str, Any]) -> dict[str, Any]:
        """The peer's idle connections (on the standby): each record checked before it is
        kept; how many are kept."""
        if self.pair.active:
            raise PairError("this host holds the addresses: it keeps no copy of the peer's")
        session, add, drop = body.get("session"), body.get("add"), body.get("drop")
        if not isinstance(session, str) or not 1 <= len(session) <= 64:
            raise PairError("session: not a session id")
        if not isinstance(add, list) or not isinstance(drop, list):
            raise PairError("add, drop: not lists")
        if session != self.kept_session:
            self.kept.clear()
            self.kept_session = session
        received = time.monotonic()
        checked: dict[str, Kept] = {}
        try:
            for raw in add:
                ident = raw.get("id") if isinstance(raw, dict) else None
                tcp = raw.get("tcp") if isinstance(raw, dict) else None
                if not isinstance(ident, str) or not 1 <= len(ident) <= MAX_ID:
                    raise PairError("id: not a connection's id")
                if not isinstance(tcp, list) or len(tcp) != 2:
                    raise PairError("tcp: not the two sockets' states")
                record = check_conn(raw, self.pair.host.routers)
                a, b = TcpState.from_json(tcp[0]), TcpState.from_json(tcp[1])
                checked[ident] = (record, a, b, received)
        except (HandoverError, RepairError) as exc:
            raise PairError(f"an idle connection from the peer: {exc}") from None
        for ident in drop:
            if isinstance(ident, str):
                self.kept.pop(ident, None)
        if len(self.kept) + len(checked) > MAX_IDLE:
            raise PairError(f"more than {MAX_IDLE} idle connections: not kept")
        self.kept.update(checked)
        return {"held": len(self.kept)}

    def clear(self) -> None:
        self.kept.clear()
        self.sent.clear()

    async def restore(self) -> None:
        """A failover: every kept connection made again and relayed (see the theory)."""
        kept, self.kept = list(self.kept.values()), {}
        if not kept:
            return
        pair, host = self.pair, self.pair.host
        made = lost = 0
        for record, a, b, received in kept:
            since = time.monotonic() - received
            socks: list[Any] = []
            try:
                for state in (a, b):
                    socks.append(restore(aged(state, since)))
                for sock in socks:
                    thaw(sock)
                    sock.setblocking(False)
                await adopt_conn(
                    host.plane, host.routers[record["group"]], record, (socks[0], socks[1])
                )
            except (RepairError, OSError, KeyError) as exc:
                log.info("ha: an idle connection could not be made again: %s", exc)
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.close()
                lost += 1
                continue
            made += 1
        pair.counts["restored"] += made
        pair.counts["lost"] += lost
        log.warning(
            "ha: made again %d idle connections the failed peer held (%d could not be)",
            made,
            lost,
        )


def _ident(cs: ClientSide) -> str | None:
    sock = cs.transport.get_extra_info("socket")
    try:
        remote, local = sock.getpeername(), sock.getsockname()
    except (OSError, AttributeError):
        return None
    return f"{remote[0]}:{remote[1]}>{local[0]}:{local[1]}"


def _record(cs: ClientSide, now: float) -> dict[str, Any] | None:
    socks = sockets_of(cs)
    if socks is None:
        return None
    try:
        states = [snapshot(s) for s in socks]
    except RepairError:
        return None
    finally:
        for s in socks:
            s.close()
    record, _ = export_conn(cs, (b"", b""), now)
    record["tcp"] = [s.to_json() for s in states]
    return record
