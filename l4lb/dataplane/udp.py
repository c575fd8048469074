"""UDP in a mark group: datagram flows routed through the group's router and affinity table.

Theory of operation
-------------------
A `UdpListener` reads one UDP service socket. A datagram from a client address and port with
no flow opens one (`Flow`): the group's `Router` takes a reference on the client's affinity
entry and picks the backend exactly as for a TCP connection (the same key, so a client pinned
over TCP is pinned over UDP and the other way round), and a socket connected to that backend
carries the client's datagrams. Its answers go back from the listener's socket; a wildcard
listener learns from IP_PKTINFO which address each datagram was sent to and answers from that
address, so a client with a connected socket (QUIC's, say) accepts them. A flow holds its
entry like an open connection and ends after `udp_idle_timeout` without a datagram either way;
the entry's persistence timeout then starts, as after a TCP close.

Each listener keeps its flows in an OrderedDict in the order of their last datagram (either
way): a datagram moves its flow to the back (`move_to_end`, O(1) in C) and stamps it with the
listener's coarse clock (`now`, set by the sweep every tick, so no clock is read per datagram).
A stamp is so up to a tick older than its datagram: the sweep allows for it (SLACK times the
time since its previous run), so that no flow ends before its timeout (at most a tick or two
after it).
The front is therefore always the flow idle longest: the sweep ends flows from the front until
one is younger than its timeout (it costs the flows it ends, not all of them), and the
`udp_max_flows` bound evicts the front (a flood of spoofed source ports replaces idle flows,
never grows past the bound, and never evicts a flow that keeps talking).

Failures: the kernel reports an ICMP error (port unreachable) on a flow's connected socket as
ECONNREFUSED on the next recv or send; that is a passive failure of the backend
(`Router.failed`), the socket is closed, and the flow is routed again at once to the router's
next choice, re-pinning the entry as a refused TCP dial would: the client's next datagram, and
its other flows (a retry from a new port), go there. The datagram that met the error is lost,
as it would be on the network; the client's retry carries it. A backend that goes down, is
disabled or removed loses its flows at their next datagram (`accepts_pinned`), so clients are
never blackholed until a timeout. Datagrams are passed whole: one recv, one send, never merged
or split. While a new pin is being settled with the shared store, a flow holds a few datagrams
(`PENDING`); more are dropped. Every drop is counted by its reason (`UdpStats.drops`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..core.backends import Backend
from ..core.connection import PAIRED, Conn
from ..core.flowstats import UdpStats
from ..core.routing import Router
from ..core.throttle import Throttle, held_note
from .dialer import Step, Stepper
from .listeners import ListenSpec, is_wildcard
from .path import NO_BACKEND, REACHED, admit, connect, lost, open_route
from .transparent import source_socket

if TYPE_CHECKING:
    from .context import DataPlane, SockAddr

log = logging.getLogger("l4lb.udp")
_throttle = Throttle()

MAX_DATAGRAM = 65536  # a recv buffer that holds any UDP payload whole
BATCH = 64  # datagrams read per wakeup before the loop serves other sockets
PENDING = 8  # datagrams a flow holds while its backend is being settled
# Answers a flow passes back before its client has sent a second datagram: a source address
# that never speaks again may be forged, and the backend's answers would go to whoever owns it
# (reflection). QUIC's own rule for an unvalidated address (RFC 9000, 8.1: three times the bytes
# of a >= 1,200-byte Initial) fits in three datagrams; a DNS answer is one.
UNVALIDATED_ANSWERS = 3
# quic_lb: flows one connection ID may steer at once: a migrating connection's old path and its
# new one (RFC 9000, 9: a client moves with a new ID; one ID on two addresses is a NAT's rebind).
QUIC_PATHS = 2
# The sweep's allowance for a stamp's age, in times the time since its previous run (see sweep).
SLACK = 1.25
CMSG_SPACE = socket.CMSG_SPACE(20)  # in_pktinfo (12 bytes) or in6_pktinfo (20)


class Flow(Conn):
    """One client (address and port) of one UDP listener: the flow's record (`Conn`: its
    route, backend, counters, times) and its backend socket."""

    __slots__ = (
        "cid",
        "client",
        "heard",
        "last",
        "listener",
        "local",
        "pending",
        "reply",
        "router",
        "sock",
        "spare",
        "stats",
        "task",
        "where",
    )

    def __init__(
        self,
        listener: UdpListener,
        where: object,
        client: SockAddr,
        *,
        reply: list[tuple[int, int, bytes]] | None,
        router: Router,
        service: int,
        stats: UdpStats,
        now: float,
    ) -> None:
        super().__init__((client[0], client[1]), listener.loop.time(), service, udp=True)
        self.listener = listener
        self.stats = stats  # its group's
        self.where = where  # its key in the listener's flows
        self.client = client
        self.reply = reply  # the control message that sends an answer from the right address
        self.router = router
        self.sock: socket.socket | None = None
        self.pending: list[bytes] | None = None  # datagrams held while its backend is chosen
        self.task: asyncio.Task[None] | None = None  # that choice, when it runs as a Task
        self.last = now  # the listener's coarse clock at its last datagram
        self.heard = 0  # datagrams from the client (2: its address is validated)
        self.local: tuple[str, int] | None = None  # its socket's, while it could loop
        self.spare = UNVALIDATED_ANSWERS  # answers it may still get until then (-1: validated)
        self.cid: bytes | None = None  # quic_lb: the connection ID that steered it

    def from_backend(self) -> None:
        """The backend socket is readable: its datagrams go back to the client, each whole."""
        sock = self.sock
        if sock is None:
            return
        listener = self.listener
        stats = self.stats
        now = listener.now
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                listener.unreachable(self, exc)
                return
            if self.heard < 2:  # not validated yet: a few answers, then none (reflection)
                if self.spare <= 0:
                    stats.drops["unvalidated"] += 1
                    continue
                self.spare -= 1
            listener.flows.move_to_end(self.where)
            self.last = now
            n = len(data)
            self.bytes_out += n
            stats.datagrams_out += 1
            stats.bytes_out += n
            try:
                if self.reply is None:
                    listener.sock.sendto(data, self.client)
                else:
                    listener.sock.sendmsg((data,), self.reply, 0, self.client)
            except OSError:
                stats.drops["client_send"] += 1


class FlowStep(Step):
    """A flow's connect step: a socket connected to the backend, at once (`timeout` 0)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__(0.0)
        self.flow = flow

    async def attempt(self, backend: Backend, port: int) -> object:
        return self.flow.listener.socket_to(self.flow, backend, port)


class UdpListener:
    """One UDP service socket: its flows, and the datagrams both ways."""

    def __init__(self, plane: DataPlane, spec: ListenSpec, sock: socket.socket) -> None:
        self.plane = plane
        self.spec = spec
        self.sock = sock
        self.wildcard = is_wildcard(spec.host)
        self.flows: OrderedDict[object, Flow] = OrderedDict()  # least recently active first
        # Flows whose client has not proved its address yet, oldest first: a bound evicts
        # these before any validated flow, so that forged sources cost no real client its flow.
        self.unvalidated: OrderedDict[object, None] = OrderedDict()
        # quic_lb: the flows each connection ID steered, oldest first (`_make_way`).
        self.by_cid: dict[bytes, list[Flow]] = {}
        self.now = time.monotonic()  # the coarse clock of the flows' `last` (see above)
        self.closed = False
        # Flows that another worker took over, by an upgrade that changed the number of
        # workers: a datagram of theirs that queued here before the steering switched is sent
        # on by the flow's own socket (a copy: its owner reads the answers), not a new flow
        self.aliases: dict[object, socket.socket] = {}
        # The datagram opening a flow and its group's counters, while admission vets it, and
        # the backend its QUIC connection ID named (`_vet`).
        self._opening: tuple[bytes, UdpStats] | None = None
        self._owner: Backend | None = None
        self._cid = b""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    # ------------------------------------------------------------------ the client side

    def _readable(self) -> None:
        sock = self.sock
        flows = self.flows
        to_end = flows.move_to_end
        now = self.now
        wildcard = self.wildcard
        for _ in range(BATCH):
            try:
                if wildcard:
                    data, anc, _flags, addr = sock.recvmsg(MAX_DATAGRAM, CMSG_SPACE)
                    dst = anc[0][2] if anc else b""
                    key: object = (addr, dst)
                else:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                    key = addr
            except BlockingIOError:
                return
            except OSError:  # an ICMP error from a client reported on the listener: no flow's
                continue
            flow = flows.get(key)
            if flow is None:
                alias = self.aliases.get(key) if self.aliases else None
                if alias is not None:
                    with contextlib.suppress(OSError):
                        alias.send(data)
                    continue
                flow = self._open(key, addr, anc if wildcard else None, data)
                if flow is None:
                    continue
            else:
                to_end(key)
                flow.last = now
            stats = flow.stats
            stats.datagrams_in += 1
            n = len(data)
            stats.bytes_in += n
            flow.bytes_in += n
            flow.heard += 1
            if flow.spare >= 0 and flow.bytes_out and flow.heard >= 2:
                flow.spare = -1  # it sent again after an answer: validated, once
                self.unvalidated.pop(key, None)
                self._validated(flow)
            backend = flow.backend
            if backend is None or not backend.accepts_pinned:
                if flow.pending is None:
                    self._route(flow)
                pending = flow.pending
                if pending is not None:  # being settled with the shared store: held
                    if len(pending) < PENDING:
                        pending.append(data)
                    else:
                        stats.drops["pending_full"] += 1
                    continue
            sock_b = flow.sock
            if sock_b is None:  # no backend took it (dropped and counted)
                continue
            try:
                sock_b.send(data)
            except BlockingIOError:
                stats.drops["backend_busy"] += 1
            except OSError as exc:
                stats.drops["backend_error"] += 1
                self.unreachable(flow, exc)

    def _open(
        self, where: object, addr: SockAddr, anc: list[tuple[int, int, bytes]] | None, data: bytes
    ) -> Flow | None:
        """A datagram from a new client address and port: a flow admitted and routed by its
        group (`path.admit`; with quic_lb, the server ID in its connection ID first:
        `QuicRouting.route`, as admission's `vet`)."""
        plane = self.plane
        runner = plane.host
        assert runner is not None
        binding = runner.udp_binding(self.spec)
        if binding is None:
            return None
        router, port, stats = binding
        if plane.loop_watch and plane.udp_outgoing and self._looped(addr, stats):
            return None
        vet = None
        if router.quic is not None:
            self._opening = (data, stats)
            vet = self._vet
        flow = Flow(
            self, where, addr, reply=None, router=router, service=port, stats=stats, now=self.now
        )
        if admit(plane, router, flow, addr[0], flows=stats, vet=vet):
            return None  # (refused: dropped, and counted)
        reply = None
        if anc:
            level, kind, info = anc[0]
            if level == socket.IPPROTO_IP:  # in_pktinfo: send from ipi_addr
                reply = [(level, kind, b"\0\0\0\0" + info[8:12] + b"\0\0\0\0")]
            else:  # in6_pktinfo: the address, any interface
                reply = [(level, kind, info[:16] + b"\0\0\0\0")]
        # (`_vet` said it, when it ran: mypyc trusts a narrowed attribute, so it is not reset
        # before `admit` in this function)
        owner: Backend | None = self._owner if vet is not None else None
        cid = self._cid
        self._owner = None
        if owner is not None:  # (once admitted: a refused datagram ends no flow of its ID)
            self._make_way(cid)
        flow.reply = reply
        route = open_route(router, flow)
        quic = router.quic
        if owner is not None and quic is not None:
            quic.steer(route, owner, router.backends)
            stats.migrations += 1
            flow.cid = cid
            self.by_cid.setdefault(cid, []).append(flow)
        self.flows[where] = flow
        self.unvalidated[where] = None
        stats.flows += 1
        stats.opened += 1
        plane.flows_changed(1)
        return flow

    def _vet(self, router: Router, key: int) -> bool:
        """quic_lb's test of the datagram opening a flow (admission's `vet`): dropped, counted,
        when no flow is to be opened for it; else its connection ID's backend, if it names one,
        kept for `_open`."""
        self._owner = None
        opening, quic = self._opening, router.quic
        assert opening is not None and quic is not None
        data, stats = opening
        how, owner, cid = quic.route(data, key, router.table)
        if how == "malformed":
            stats.quic["unroutable"] += 1
            stats.drops["quic_malformed"] += 1
            return False
        stats.quic[how] += 1
        if how == "unroutable" or how == "full":
            stats.drops["quic_" + how] += 1
            return False
        self._owner = owner
        self._cid = cid
        return True

    def _make_way(self, cid: bytes) -> None:
        """At most QUIC_PATHS flows at once are steered by one connection ID (a migrating
        connection's old path and its new): one more ends the oldest of them whose client never
        proved its address, else the oldest (the path the connection left), so that a replayed
        ID from forged sources costs its backend no more than two slots and never locks a real
        client out."""
        paths = self.by_cid.get(cid)
        if paths is None or len(paths) < QUIC_PATHS:
            return
        old = next((f for f in paths if f.spare >= 0), paths[0])
        old.stats.evicted += 1
        self.end(old, "evicted")

    @staticmethod
    def _validated(flow: Flow) -> None:
        """Its client owns its address: the entry it made holds like a TCP client's."""
        route, table = flow.route, flow.router.table
        if route is not None and route.entry is not None and table is not None:
            table.confirm(route.entry)

    def _looped(self, addr: SockAddr, stats: UdpStats) -> bool:
        """A datagram from one of l4lb's own flow sockets: a backend that leads back to a
        listener of ours. Dropped (counted), and that backend taken down as a looping TCP dial
        takes it, so that one datagram makes a handful of loops, not a storm."""
        hit = self.plane.udp_outgoing.get((addr[0].removeprefix("::ffff:"), addr[1]))
        if hit is None:
            return False
        stats.drops["looped"] += 1
        router, backend = hit
        held = _throttle.allow(("udp loop", router.name, backend.name))
        if held is not None:
            log.warning(
                "group %s: a datagram from l4lb's own flow socket %s:%d: backend %s leads back"
                " to l4lb%s",
                router.name,
                addr[0],
                addr[1],
                backend.name,
                held_note(held),
            )
        if backend is not router.sorry:
            router.set_health(backend, False, "it leads back to l4lb itself")
        return True

    # ------------------------------------------------------------------ the backend side

    def _route(self, flow: Flow) -> None:
        """Give `flow` a backend socket (a new flow, or one whose backend failed or went away):
        `path.connect`, which ends at once without a shared store; with one, the flow holds its
        datagrams (`pending`) while the store settles the pin."""
        route = flow.route
        assert route is not None
        if flow.backend is not None:  # it went down, was disabled or removed: move on
            self._drop_socket(flow)
            flow.router.leave(route)
            flow.backend = None
        flow.pending = []
        if self.plane.store is None:
            Stepper().start(self._connect(flow))  # (no await without a store: done on return)
        else:  # (the store's calls use asyncio.timeout, which needs a Task)
            flow.task = self.loop.create_task(self._connect(flow))

    async def _connect(self, flow: Flow) -> None:
        step = FlowStep(flow)
        try:
            result = await connect(self.plane, flow.router, flow, step, wait=False)
        except Exception:  # the store's own failures fall back inside it; be safe here
            log.exception("group %s: routing a UDP flow failed", flow.router.name)
            result = NO_BACKEND
        flow.task = None
        held, flow.pending = flow.pending or [], None
        sock = step.made
        if result != REACHED or not isinstance(sock, socket.socket):
            if result == NO_BACKEND:
                flow.stats.drops["no_backend"] += 1
            self.end(flow, result, give_up=True)
            return
        flow.sock = sock
        backend = flow.backend
        if backend is not None and backend.may_loop:  # its datagrams could come back to us
            flow.local = local = sock.getsockname()[:2]
            self.plane.udp_outgoing[local] = (flow.router, backend)
        self.loop.add_reader(sock.fileno(), flow.from_backend)
        for data in held:
            try:
                sock.send(data)
            except OSError:
                flow.stats.drops["backend_busy"] += 1

    def socket_to(self, flow: Flow, backend: Backend, port: int) -> socket.socket:
        """A socket for `flow` connected to `backend`'s `port`, from the group's `source` when
        it has one (the client's own address and port, or a fixed address)."""
        family = socket.AF_INET6 if ":" in backend.address else socket.AF_INET
        source = flow.router.spec.source
        if source is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        else:
            client = source == "client"
            sock = source_socket(
                socket.SOCK_DGRAM,
                backend.address,
                flow.client[0] if client else source,
                flow.client[1] if client else 0,
                client,
            )
        try:
            sock.setblocking(False)
            sock.connect((backend.address, port))
        except OSError:
            sock.close()
            raise
        return sock

    def unreachable(self, flow: Flow, exc: OSError) -> None:
        """An ICMP error on the flow's backend socket: a passive failure of that backend, and
        the flow routed again at once (the entry re-pinned to the next backend)."""
        backend = flow.backend
        route = flow.route
        if backend is None or route is None:
            return
        flow.stats.unreachable += 1
        self._drop_socket(flow)
        flow.backend = None
        lost(flow.router, route, backend, exc)
        log.debug(
            "group %s: backend %s unreachable over UDP: %s",
            flow.router.name,
            backend.name,
            exc.strerror,
        )
        # Re-pin now, not at the next datagram: the client's other flows (a retry often comes
        # from a new port) must not be sent to the backend that just failed.
        self._route(flow)

    def _drop_socket(self, flow: Flow) -> None:
        sock = flow.sock
        if flow.local is not None:
            self.plane.udp_outgoing.pop(flow.local, None)
            flow.local = None
        if sock is not None:
            flow.sock = None
            self.loop.remove_reader(sock.fileno())
            sock.close()

    # ------------------------------------------------------------------ ends

    def end(self, flow: Flow, termination: str, *, give_up: bool = False) -> None:
        """The flow is over: its socket closed, its entry released (its persistence timeout
        starts), its line logged (`give_up`: no backend took it)."""
        where = flow.where
        if self.flows.pop(where, None) is None:
            return
        self.unvalidated.pop(where, None)
        if flow.cid is not None:
            paths = self.by_cid.get(flow.cid)
            if paths is not None:
                paths.remove(flow)
                if not paths:
                    del self.by_cid[flow.cid]
        task = flow.task
        if task is not None:  # its pin being settled: given up (the route is released below)
            flow.task = None
            task.cancel()
        flow.stats.flows -= 1
        self.plane.flows_changed(-1)
        self._drop_socket(flow)
        flow.end(termination)
        flow.router.end(flow, now=self.loop.time(), given_up=give_up)

    def sweep(self, now: float) -> None:
        """Move the coarse clock on, and end the flows idle past their group's
        udp_idle_timeout: from the front, the longest idle first (see the theory above). A
        flow's stamp may be up to the time since the previous sweep older than its last
        datagram, so that much (with a margin for a late sweep) is added to the timeout: a flow
        never ends early (one was logged at 9158 ms of a 10 s timeout)."""
        slack = (now - self.now) * SLACK
        self.now = now
        flows = self.flows
        while flows:
            flow = next(iter(flows.values()))
            if now - flow.last < flow.router.spec.udp_idle_timeout + slack:
                return
            self.end(flow, "idle_timeout")

    def evict_oldest(self) -> bool:
        """End the oldest unvalidated flow, else the flow idle longest (the bound is reached);
        False when there is none."""
        if self.unvalidated:
            flow = self.flows[next(iter(self.unvalidated))]
        elif self.flows:
            flow = next(iter(self.flows.values()))
        else:
            return False
        flow.stats.evicted += 1
        self.end(flow, "evicted")
        return True

    def oldest(self) -> tuple[bool, float] | None:
        """(validated, last heard) of the flow `evict_oldest` would end: listeners are asked
        in that order, so that an unvalidated flow of any group goes before a validated one."""
        if self.unvalidated:
            return False, self.flows[next(iter(self.unvalidated))].last
        return (True, next(iter(self.flows.values())).last) if self.flows else None

    # ------------------------------------------------------------------ upgrades

    def pause(self) -> None:
        """Stop reading, the listener and every flow (an upgrade hands them over): datagrams
        wait in the sockets' buffers."""
        self.loop.remove_reader(self.sock.fileno())
        for flow in self.flows.values():
            if flow.sock is not None:
                self.loop.remove_reader(flow.sock.fileno())

    def resume(self) -> None:
        """Undo `pause` (the upgrade failed)."""
        self.loop.add_reader(self.sock.fileno(), self._readable)
        for flow in self.flows.values():
            if flow.sock is not None:
                self.loop.add_reader(flow.sock.fileno(), flow.from_backend)

    def adopt(
        self, binding: tuple[Router, int, UdpStats], record: dict[str, Any], sock: socket.socket
    ) -> Flow:
        """A flow the previous process handed over (a checked record, see `handform.py`), on
        its socket: appended (records come in their listener's order, idle longest first)."""
        router, port, stats = binding
        client = tuple(record["client"])
        dst = record["dst"]
        where: object = (client, dst) if self.wildcard else client
        reply = (
            [(record["reply"][0], record["reply"][1], record["reply"][2])]
            if record["reply"]
            else None
        )
        flow = Flow(
            self, where, client, reply=reply, router=router, service=port, stats=stats,
            now=self.now - record["idle"],
        )  # fmt: skip
        backend = router.by_name[record["backend"]]
        flow.key = record["key"]
        flow.started = self.loop.time() - record["age"]
        flow.bytes_in, flow.bytes_out = record["bytes_in"], record["bytes_out"]
        flow.heard, flow.spare = record["heard"], record["spare"]
        flow.backend = backend
        flow.route = router.adopt(flow.key, backend, provisional=flow.spare >= 0)
        flow.phase = PAIRED
        sock.setblocking(False)
        flow.sock = sock
        if record["cid"] is not None:
            flow.cid = record["cid"]
            self.by_cid.setdefault(record["cid"], []).append(flow)
        self.flows[where] = flow
        if flow.spare >= 0:
            self.unvalidated[where] = None
        stats.flows += 1
        self.plane.flows_changed(1)
        self.loop.add_reader(sock.fileno(), flow.from_backend)
        return flow

    def alias(self, record: dict[str, Any], sock: socket.socket) -> None:
        """A flow another worker adopted (see `aliases`), until `drop_aliases`."""
        client = tuple(record["client"])
        where: object = (client, record["dst"]) if self.wildcard else client
        sock.setblocking(False)
        old = self.aliases.pop(where, None)
        if old is not None:
            old.close()
        self.aliases[where] = sock

    def drop_aliases(self) -> int:
        n = len(self.aliases)
        for sock in self.aliases.values():
            sock.close()
        self.aliases = {}
        return n

    def close(self, termination: str = "shutdown") -> None:
        self.drop_aliases()
        if self.closed:
            return
        self.closed = True
        for flow in list(self.flows.values()):
            self.end(flow, termination)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        return None
