"""The taking side of an HA hand-over (runtime/pair.py, steps 4 and 6): the peer's connections
made again here in repair mode (`prepare`), then, once this host holds the addresses, relayed
(`commit`), or dropped without a packet sent (`abort`, or no commit within the deadline).

Everything the peer sends is input like any other: each record is checked as an upgrade's is
(runtime/handform.py: its group and backend are this configuration's), each socket's state as
dataplane/repair.py checks it, their number bounded; one bad record refuses the whole prepare,
and the peer then keeps serving everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from ..dataplane.repair import (
    RepairError,
    TcpState,
    any_source,
    check_address,
    restore,
    thaw,
)
from ..dataplane.transfer import adopt_all
from . import netlock
from .handform import HandoverError, check_conn, check_flow
from .pair import Pair, PairError, until

log = logging.getLogger("l4lb.ha")
MAX_CONNS = 200_000  # connections one hand-over may bring
MAX_FLOWS = 200_000

Conn = tuple[dict[str, Any], TcpState, TcpState]


class Taking:
    """One hand-over to this host, prepared and waiting for its commit."""

    def __init__(self, pair: Pair, hid: str, conns: list[Conn], flows: list[dict[str, Any]]):
        self.pair = pair
        self.id = hid
        self.conns = conns
        self.flows = flows
        self.socks: list[tuple[socket.socket, socket.socket]] = []
        self.flow_socks: list[socket.socket] = []
        self.expiry: asyncio.TimerHandle | None = None
        self.began = time.monotonic()

    async def make(self) -> None:
        """Every socket made again (repair mode), behind this host's own lock."""
        tuples = []
        for _, *states in self.conns:
            for st in states:
                tuples.append((st.remote[0], st.remote[1], st.local[0], st.local[1]))
        try:
            await netlock.lock(tuples)
        except netlock.LockError as exc:
            raise PairError(f"the network lock: {exc}") from None
        try:
            for _, cstate, bstate in self.conns:
                a = restore(cstate)
                try:
                    b = restore(bstate)
                except RepairError:
                    a.close()
                    raise
                self.socks.append((a, b))
            for record in self.flows:
                self.flow_socks.append(_flow_socket(record))
        except (RepairError, OSError) as exc:
            self.close()
            await netlock.unlock()
            raise PairError(f"a socket could not be made here: {exc}") from None

    def close(self) -> None:
        """Drop every socket made (in repair mode: nothing is sent)."""
        for a, b in self.socks:
            a.close()
            b.close()
        for s in self.flow_socks:
            s.close()
        self.socks, self.flow_socks = [], []


def _flow_socket(record: dict[str, Any]) -> socket.socket:
    local, remote = record["local"], record["remote"]
    six = ":" in local[0]
    sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        any_source(sock, sock.family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((local[0], local[1]))
        sock.connect((remote[0], remote[1]))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _checked(pair: Pair, body: dict[str, Any]) -> tuple[str, list[Conn], list[dict[str, Any]]]:
    routers = pair.host.routers
    hid, conns, flows = body.get("id"), body.get("conns"), body.get("flows", [])
    if not isinstance(hid, str) or not 1 <= len(hid) <= 64:
        raise PairError("id: not a hand-over's id")
    if not isinstance(conns, list) or len(conns) > MAX_CONNS:
        raise PairError(f"conns: not a list of at most {MAX_CONNS} connections")
    if not isinstance(flows, list) or len(flows) > MAX_FLOWS:
        raise PairError(f"flows: not a list of at most {MAX_FLOWS} flows")
    out: list[Conn] = []
    out_flows: list[dict[str, Any]] = []
    try:
        for raw in conns:
            record = check_conn(raw, routers)
            tcp = raw.get("tcp")
            if not isinstance(tcp, list) or len(tcp) != 2:
                raise PairError("tcp: not the two sockets' states")
            out.append((record, TcpState.from_json(tcp[0]), TcpState.from_json(tcp[1])))
        for raw in flows:
            record = check_flow(raw, routers)
            for key in ("local", "remote"):
                record[key] = check_address(raw.get(key), key)
            out_flows.append(record)
    except (HandoverError, RepairError) as exc:
        raise PairError(f"a record from the peer: {exc}") from None
    return hid, out, out_flows


async def prepare(pair: Pair, body: dict[str, Any]) -> dict[str, Any]:
    """The peer's connections made here, waiting for `commit` (within `ha.timeout` and then
    some: else dropped)."""
    if pair.busy or pair.host.upgrading:
        raise PairError("a hand-over or an upgrade is running here already")
    if pair.holds():
        raise PairError("this host holds the addresses: it cannot take a hand-over")
    hid, conns, flows = _checked(pair, body)
    pair.busy = True
    taking = Taking(pair, hid, conns, flows)
    try:
        await taking.make()
    except PairError:
        pair.busy = False
        pair.counts["refused"] += len(conns)
        raise
    pair.taking = taking
    pair.expect_addresses = True
    loop = asyncio.get_running_loop()
    deadline = pair.spec.timeout + 30.0
    taking.expiry = loop.call_later(deadline, lambda: loop.create_task(_expire(pair, hid)))
    log.info("ha: the peer hands over %d connections and %d flows", len(conns), len(flows))
    return {"prepared": len(conns), "flows": len(flows)}


async def _expire(pair: Pair, hid: str) -> None:
    taking = pair.taking
    if taking is not None and taking.id == hid:
        log.warning("ha: the peer's hand-over was not committed in time: dropped")
        await abort(pair, {"id": hid})


async def abort(pair: Pair, body: dict[str, Any]) -> dict[str, Any]:
    taking = pair.taking
    if taking is None or taking.id != body.get("id"):
        return {"aborted": 0}
    if taking.expiry is not None:
        taking.expiry.cancel()
    n = len(taking.socks)
    taking.close()
    pair.taking = None
    pair.busy = False
    pair.expect_addresses = False
    pair.counts["refused"] += n
    await netlock.unlock()
    return {"aborted": n}


async def commit(pair: Pair, body: dict[str, Any]) -> dict[str, Any]:
    """Wait until this host holds the addresses, then relay every connection made; what was
    taken. PairError (everything dropped here, the peer serves on) if they do not come."""
    taking = pair.taking
    if taking is None or taking.id != body.get("id"):
        raise PairError("no such hand-over prepared here")
    if taking.expiry is not None:
        taking.expiry.cancel()
    if not await until(pair.holds, pair.spec.timeout):
        await abort(pair, body)
        raise PairError(
            f"the addresses did not come to this host in {pair.spec.timeout:g} s"
            " (is keepalived running, and tracking the track file?)"
        )
    waited = time.monotonic() - taking.began
    await netlock.unlock()
    for a, b in taking.socks:  # (a window probe each: the peers answer, and send again)
        for sock in (a, b):
            with contextlib.suppress(OSError):
                thaw(sock)
            sock.setblocking(False)
    took = await _adopt(pair, taking)
    flows = _adopt_flows(pair, taking)
    pair.counts["taken"] += took
    pair.taking = None
    pair.busy = False
    pair.last = {
        "at": time.time(),
        "direction": "taken",
        "connections": took,
        "flows": flows,
        "seconds": round(time.monotonic() - taking.began, 3),
        "addresses_after": round(waited, 3),
    }
    log.info("ha: took over %d connections and %d flows from the peer", took, flows)
    return {"took": took, "flows": flows}


async def _adopt(pair: Pair, taking: Taking) -> int:
    host = pair.host
    conns = [(c[0], s) for c, s in zip(taking.conns, taking.socks, strict=True)]
    return len(conns) - await adopt_all(host.plane, host.routers, conns, "ha")


def _adopt_flows(pair: Pair, taking: Taking) -> int:
    listeners = pair.host.listeners
    by_where = {(x.spec.host, x.spec.port): x for x in listeners.udp_listeners()}
    n = 0
    for record, sock in zip(taking.flows, taking.flow_socks, strict=True):
        listener = by_where.get((record["listener"][0], record["listener"][1]))
        binding = listeners.udp_binding(listener.spec) if listener is not None else None
        if listener is None or binding is None or record["backend"] not in binding[0].by_name:
            sock.close()
            continue
        flow = listener.adopt(binding, record, sock)
        listener.loop.add_reader(sock.fileno(), flow.from_backend)
        n += 1
    taking.flow_socks = []
    return n
