"""The listening sockets of one process, and which group and service port each serves.

Listeners are keyed by (address, port, protocol), and each accept (or a UDP listener's new flow)
looks up the group and service port it serves in `bindings`, so a reload that keeps a port keeps
its socket open and never refuses a connection; only new ports are bound (before anything else
changes, all or nothing) and removed ones closed. `Listeners` is the data plane's `Host`: the
UDP listeners ask it for their group and to make room for a new flow.

A worker may also serve, for `RETIRE` seconds after an upgrade that lowered the number of
workers, the sockets of old workers that have no successor (`serve_retiring`): their place
in the reuseport group is gone at the commit (the steering program counts fewer), but what
queued on them before it, or was mid-handshake, is accepted here rather than reset.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from ..core.flowstats import UdpStats
from ..core.routing import Router
from ..dataplane.context import DataPlane
from ..dataplane.dialer import as_factory
from ..dataplane.listeners import BACKLOG, MARKS, ListenSpec, Where, bind, close_all
from ..dataplane.relay import ClientSide, MarkedClientSide, ProxyClientSide
from ..dataplane.udp import UdpListener
from .errors import StartupError

Serving = asyncio.AbstractServer | UdpListener
RETIRE = 10.0  # seconds an old worker's retiring socket is served (SYN-ACK retries: 1+2+4 s)


class Listeners:
    def __init__(
        self,
        plane: DataPlane,
        routers: Mapping[str, Router],
        inherited: dict[Where, socket.socket] | None,
    ) -> None:
        self.plane = plane
        self.routers = routers
        # As a worker: the listening sockets the supervisor opened, by (address, port); a
        # worker never binds one itself, since its place in the reuseport group matters.
        self.inherited = inherited
        # An upgrade's: the inherited sockets are the ones the previous process served; a
        # port it did not serve is bound here (a worker binds nothing).
        self.partial = False
        self.held: list[Serving] = []  # served but not yet accepting (`serve(hold=True)`)
        # Old workers' sockets, for a while, by (where, old index) (`serve_retiring`)
        self.retiring: dict[tuple[Where, int], Serving] = {}
        self.settling = False  # an upgrade that changed the number of workers: until `retire`
        self.listening: list[ListenSpec] = []
        self.serving: dict[Where, tuple[ListenSpec, Serving]] = {}
        self.bindings: dict[Where, tuple[Router, int]] = {}
        self.udp_stats: dict[str, UdpStats] = {}  # per group, kept across reloads
        self.freebind = False  # an HA pair's: listen on addresses this host does not hold yet
        plane.host = self

    def bind_new(self, specs: list[ListenSpec]) -> list[tuple[ListenSpec, socket.socket]]:
        """Bind every spec not bound yet; all or nothing."""
        bound: list[tuple[ListenSpec, socket.socket]] = []
        for spec in specs:
            current = self.serving.get(spec.where)
            if current is not None and current[0].v6only == spec.v6only:
                continue
            if self.inherited is not None:
                sock = self.inherited.pop(spec.where, None)
                if sock is not None:
                    bound.append((spec, sock))
                    continue
                if not self.partial:
                    close_all(s for _, s in bound)
                    raise StartupError(f"the supervisor passed no socket for {spec}")
            try:
                # In a reuseport group of one, so that an upgrade to workers can append to it
                # (workers/upgrade.py); a plain bind first fails where another process listens
                # with SO_REUSEPORT (a second l4lb on the same file), as the supervisor's does.
                free = self.freebind
                bind(spec, freebind=free).close()
                bound.append((spec, bind(spec, reuseport=True, freebind=free)))
            except OSError as exc:
                close_all(s for _, s in bound)
                raise StartupError(
                    f"cannot listen on {spec} for group {spec.group!r}: {exc.strerror or exc}"
                ) from None
        return bound

    async def serve(
        self, bound: list[tuple[ListenSpec, socket.socket]], hold: bool = False
    ) -> None:
        """Serve `bound`; `hold`: not yet (an upgrade's new process, until `release`)."""
        for spec, sock in bound:
            self.serving[spec.where] = (spec, await self._serve_one(spec, sock, hold))

    async def serve_retiring(self, socks: Mapping[tuple[Where, int], socket.socket]) -> None:
        """Serve old workers' sockets as their ports' own (held, as `serve(hold=True)`) until
        `retire` closes them; one whose port is gone is closed."""
        specs = {s.where: s for s in self.listening}
        for (where, old), sock in socks.items():
            spec = specs.get(where)
            if spec is None:
                sock.close()
                continue
            self.retiring[(where, old)] = await self._serve_one(spec, sock, hold=True)

    def retire(self) -> int:
        """Close the retiring sockets, and drop the UDP listeners' aliases of flows other
        workers took over (`UdpListener.aliases`); how many there were."""
        n = len(self.retiring)
        for srv in self.retiring.values():
            srv.close()
        self.retiring = {}
        for _, x in self.serving.values():
            if isinstance(x, UdpListener):
                n += x.drop_aliases()
        self.settling = False
        return n

    async def _serve_one(self, spec: ListenSpec, sock: socket.socket, hold: bool) -> Serving:
        loop = asyncio.get_running_loop()
        bindings = self.bindings
        plane = self.plane
        where = spec.where
        if spec.proto == "udp":
            udp = UdpListener(plane, spec, sock)
            if hold:
                udp.pause()
                self.held.append(udp)
            return udp

        if spec.group == MARKS:

            def marked() -> ClientSide:
                return MarkedClientSide(plane)

            factory = marked
        else:

            def grouped(where: Where = where) -> ClientSide:
                router, service_port = bindings[where]
                if router.proxy_trusted is not None:
                    return ProxyClientSide(plane, router, service_port)
                return ClientSide(plane, router, service_port)

            factory = grouped
        srv = await loop.create_server(
            as_factory(factory), sock=sock, backlog=BACKLOG, start_serving=not hold
        )
        if hold:
            self.held.append(srv)
        return srv

    async def release(self) -> None:
        """Serve what `serve` held."""
        for x in self.held:
            if isinstance(x, UdpListener):
                x.resume()
            else:
                await x.start_serving()
        self.held = []

    def set_bindings(self, specs: list[ListenSpec]) -> None:
        """Point every listener at its group's router as the routers are now."""
        self.bindings.clear()
        for spec in specs:
            if spec.group != MARKS:
                self.bindings[spec.where] = (self.routers[spec.group], spec.port)
                if spec.proto == "udp":
                    self.udp_stats.setdefault(spec.group, UdpStats())
        self.plane.by_mark = {
            r.spec.kernel_mark: r for r in self.routers.values() if r.spec.kernel_mark is not None
        }
        self.listening = specs

    def close_flipped(self, wanted: Mapping[Where, ListenSpec]) -> None:
        """v6-only flips need the old socket gone first: the one change that cannot be
        seamless."""
        for where, (spec, srv) in list(self.serving.items()):
            if where in wanted and wanted[where].v6only != spec.v6only:
                srv.close()
                del self.serving[where]

    def close_unwanted(self, wanted: Mapping[Where, ListenSpec]) -> list[str]:
        """Stop listening where no group listens any more (open connections carry on)."""
        changes = []
        for where, (spec, srv) in list(self.serving.items()):
            if where not in wanted:
                srv.close()
                del self.serving[where]
                changes.append(f"stopped listening on {spec}")
        return changes

    def close(self) -> None:
        for _, srv in self.serving.values():
            srv.close()
        self.retire()

    async def wait_closed(self) -> None:
        for _, srv in self.serving.values():
            await srv.wait_closed()

    # ------------------------------------------------------------------ the data plane's Host

    def udp_binding(self, spec: ListenSpec) -> tuple[Router, int, UdpStats] | None:
        """The group, service port and counters a UDP listener's new flow belongs to."""
        bound = self.bindings.get(spec.where)
        if bound is None:
            return None
        router, port = bound
        return router, port, self.udp_stats[router.name]

    def udp_listeners(self) -> list[UdpListener]:
        return [x for _, x in self.serving.values() if isinstance(x, UdpListener)]

    def evict_udp(self, group: str | None) -> bool:
        """The group is at udp_max_flows (or the descriptors are all taken): its flow idle
        longest goes (None: the flow idle longest of any group, for a TCP connection). False
        if there is none."""
        candidates = [
            (oldest, i, x)
            for i, x in enumerate(self.udp_listeners())
            if (group is None or x.spec.group == group) and (oldest := x.oldest()) is not None
        ]
        for _, _, listener in sorted(candidates, key=lambda c: (c[0], c[1])):
            if listener.evict_oldest():
                return True
        return False
