"""The data plane's context: the one object the relay, the UDP listeners and the dialer share.

After hypercorn's `WorkerContext` and uvicorn's `ServerState`: a connection is given this, never
the server that runs it. It holds what the hot path reads and writes (the connection registry,
the descriptor budget, the loop guard's maps, the dial's loop, slots, deadlines and store) and
the counters the metrics read from them. What the data plane must ask of its runner (a UDP
listener's group, making room for a new flow) goes through `Host`, a Protocol defined here,
below both: the data plane imports nothing of the runtime.

The descriptor budget: a relayed TCP connection holds two descriptors, a UDP flow one. `budget`
is how many connections fit under RLIMIT_NOFILE (less a reserve for listeners, checks, the
admin API and logs); `max_live` is that less what the flows hold, and an accept beyond it is
refused (counted) rather than left for the loop to drop silently. Neither protocol can starve
the other: UDP flows never hold more than half the descriptors (a flow costs an attacker one
forged datagram, a connection a handshake), and a TCP connection that finds the budget full
ends the flows idle longest to make room (`make_room`, counted as `yielded`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..core.local import is_local_address
from ..core.throttle import Throttle, held_note
from .dialer import RESOURCE_ERRNOS, Deadlines, SlotQueue

if TYPE_CHECKING:
    from ..core.backends import Backend
    from ..core.connection import Conn
    from ..core.flowstats import UdpStats
    from ..core.routing import Router
    from .listeners import ListenSpec
    from .store import RedisStore

log = logging.getLogger("l4lb.server")
_throttle = Throttle()

# Descriptors kept for what is not a relayed connection: listeners, the admin API and its
# clients, health checks, the shared store, the state file, logs.
# A socket address as the socket module gives it: (host, port), or IPv6's (host, port, flowinfo,
# scope_id). Kept whole where it is sent back to (a UDP client); compiled code checks a
# `tuple[str, int]` for its length, so raw addresses are typed as this.
SockAddr = tuple[Any, ...]

FD_RESERVE = 64


def connection_budget() -> int:
    """How many relayed connections (two descriptors each) fit under RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - FD_RESERVE) // 2)


class Side(Protocol):
    """One socket of a relayed connection, as the registry's readers see it."""

    seen: bool


class Connection(Protocol):
    """A relayed connection in the registry (`relay.ClientSide`), as the sweeper, the API's read
    models and `on_down: close` see it: its record (`conn`) and its sockets' idle marks."""

    router: Router
    conn: Conn
    seen: bool
    idle_since: float

    @property
    def peer(self) -> Side | None: ...

    def ended(self, how: str) -> None: ...

    def close(self) -> None: ...

    def reset_all(self) -> None: ...

    def looped(self, where: tuple[str, int]) -> None: ...


class Host(Protocol):
    """What the data plane asks of the process that runs it (`runtime.Runtime`)."""

    def udp_binding(self, spec: ListenSpec) -> tuple[Router, int, UdpStats] | None:
        """The group, service port and counters a UDP listener's new flow belongs to."""

    def evict_udp(self, group: str | None) -> bool:
        """End the group's flow idle longest (None: any group's); False if there is none."""


class DataPlane:
    """Shared by every connection and flow of one process (see the theory above)."""

    def __init__(self, routers: Mapping[str, Router], store: RedisStore | None) -> None:
        self.routers = routers  # the runtime's, updated in place by a reload
        self.host: Host | None = None  # set by the runtime before anything is served
        self.store = store
        self.slots = SlotQueue()
        self.deadlines = Deadlines()  # the dials' connect deadlines, one sweep for all
        self.live: set[Connection] = set()  # open relayed connections
        self._quiet: asyncio.Event | None = None
        self.budget = self.max_live = connection_budget()
        self.udp_open = 0  # UDP flows open, all groups
        self.yielded = 0  # flows ended to make room for a TCP connection
        # Connections refused for want of descriptors, by errno name
        self.accept_errors: dict[str, int] = {}
        # The loop guard: local (address, port) of open dials to backends that could lead back
        # to us, and open clients from such addresses (`relay.ClientSide.looped`).
        self.loop_watch = False  # some backend could lead back to us (`watch_loops`)
        self.outgoing: dict[tuple[str, int], tuple[Router, Backend]] = {}
        self.udp_outgoing: dict[tuple[str, int], tuple[Router, Backend]] = {}  # flows' sockets
        self.inbound: dict[tuple[str, int], Connection] = {}
        self.loops = 0
        self.by_mark: dict[int, Router] = {}  # kernel_mark -> group, for the marks listener
        self.unmatched_marks = 0  # connections whose mark no group claims
        self.loop_time = time.monotonic  # the loop's clock, from `attach`
        self.loop: asyncio.AbstractEventLoop  # the loop it runs on, from `attach`

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on `loop`: its clock for the records, and its failed accepts counted here."""
        self.loop = loop
        self.loop_time = loop.time
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(self._loop_errors)
        self.budget = self.max_live = connection_budget()

    # ------------------------------------------------------------------ the registry

    def track(self, conn: Connection) -> None:
        conn.idle_since = self.loop_time()
        self.live.add(conn)

    def forget(self, conn: Connection) -> None:
        self.live.discard(conn)
        if self._quiet is not None and not self.live:
            self._quiet.set()
            self._quiet = None

    async def wait_quiet(self) -> None:
        """Return once no connection is open or being dialed."""
        if self.live:
            if self._quiet is None:
                self._quiet = asyncio.Event()
            await self._quiet.wait()

    def close_connections(self, router: Router, backend: Backend) -> int:
        """Close every open connection of `backend` in `router`'s group; how many."""
        doomed = []
        for c in self.live:
            route = c.conn.route  # (its backend: the one connected, or being dialed)
            if c.router is router and route is not None and route.backend is backend:
                doomed.append(c)
        for conn in doomed:
            conn.ended("backend_down")
            conn.close()
        return len(doomed)

    def watch_loops(
        self, routers: Mapping[str, Router], tcp: set[int], udp: set[int], redirect: bool
    ) -> None:
        """Which backends a dial or a flow could come back to us from: a local address with
        one of our listening ports, `tcp` or `udp` (`l4lb check` refuses those, but not names,
        which are judged here once resolved, at start and at every resolve; nor a reload's or
        an inherited config), or any local one when kernel marks REDIRECT traffic to us
        (`redirect`). Only their sockets are remembered, and clients compared with them."""
        local: dict[str, bool] = {}
        watch = False
        for router in routers.values():
            spec = router.spec
            for b in router.all_backends():
                ours = not b.unresolved and (
                    redirect
                    or any(b.port_for(p) in tcp for p in spec.ports)
                    or any(b.udp_port_for(p) in udp for p in spec.udp_ports)
                )
                if ours and b.address not in local:
                    local[b.address] = is_local_address(b.address)
                b.may_loop = ours and local[b.address]
                watch = watch or b.may_loop
        self.loop_watch = watch

    # ------------------------------------------------------------------ descriptors

    def accept_error(self, name: str, detail: str) -> None:
        """Count a connection lost for want of a resource; log it at most once a second."""
        self.accept_errors[name] = self.accept_errors.get(name, 0) + 1
        held = _throttle.allow(("accept", name))
        if held is not None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning(
                "%s: %s (descriptor limit %d, %d connections open); raise LimitNOFILE or"
                " ulimit -n%s",
                name,
                detail,
                soft,
                len(self.live),
                held_note(held),
            )

    def _loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The standard loop reports a failed accept() here (uvloop drops it silently, which
        `max_live` exists to prevent); count those by errno, pass anything else on."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            self.accept_error(errno.errorcode[exc.errno], "accept() failed")
            return
        loop.default_exception_handler(context)

    def flows_changed(self, delta: int) -> None:
        """A UDP flow opened (+1) or ended (-1): the descriptors left for TCP move with it."""
        self.udp_open += delta
        self.max_live = self.budget - (self.udp_open + 1) // 2

    def room_for_tcp(self) -> bool:
        """Whether a new TCP connection has its descriptors (the dial's too), making room by
        ending the UDP flows idle longest, any group's, if it must."""
        return len(self.live) < self.max_live or self.make_room()

    def room_for_flow(self, router: Router, flows: UdpStats) -> bool:
        """Whether a new UDP flow of `router`'s group (its counters `flows`) has a descriptor:
        at its group's `udp_max_flows` the group's flow idle longest ends first; then, with every
        descriptor taken (beside the open TCP connections'), one more."""
        host = self.host
        if host is None:
            return False
        if flows.flows >= (router.spec.udp_max_flows or self.budget):
            host.evict_udp(router.name)
        return not self._descriptors_full() or host.evict_udp(router.name)

    def _descriptors_full(self) -> bool:
        """No descriptor left for one more UDP flow: the flows' half is taken, or every
        descriptor is (beside the open TCP connections')."""
        return self.udp_open >= self.budget or self.udp_open + 2 * len(self.live) >= 2 * self.budget

    def make_room(self) -> bool:
        """A TCP connection finds the budget full: end the flows idle longest (any group's)
        until it fits; whether it does."""
        host = self.host
        while len(self.live) >= self.max_live and self.udp_open and host is not None:
            if not host.evict_udp(None):
                break
            self.yielded += 1
        return len(self.live) < self.max_live
