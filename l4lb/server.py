"""The balancer's lifecycle: start listeners, serve until told to stop, then drain and close.

`Server.serve(shutdown_trigger)` takes an awaitable to wait on instead of installing signal
handlers itself (the CLI wires SIGTERM/SIGINT to it; tests pass an Event), after hypercorn.
Live connections are tracked in a set, since uvloop's server cannot close its clients.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable

from .backends import Backend
from .config import Config
from .dialer import SlotQueue
from .keys import mask_prefix_len
from .listeners import BACKLOG, ListenSpec, bind, close_all, listen_specs
from .monitor import HealthMonitor
from .relay import ClientSide, reset
from .routing import Router

log = logging.getLogger("l4lb.server")


class StartupError(Exception):
    """The balancer cannot start (a port it cannot bind, say); the message is one line."""


class Server:
    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.routers = {g.name: Router(g, clock, rng) for g in config.groups}
        self.live: set[ClientSide] = set()
        self.slots = SlotQueue()
        self.monitor = HealthMonitor(self.routers, self.close_connections, rng)
        self.listening: list[ListenSpec] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._quiet: asyncio.Event | None = None

    # ------------------------------------------------------------------ connection tracking

    def track(self, conn: ClientSide) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self.live.add(conn)

    def forget(self, conn: ClientSide) -> None:
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

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        bound: list[tuple[ListenSpec, socket.socket]] = []
        for spec in listen_specs(self.config):
            try:
                bound.append((spec, bind(spec)))
            except OSError as exc:
                close_all(s for _, s in bound)
                raise StartupError(
                    f"cannot listen on {spec} for group {spec.group!r}: {exc.strerror or exc}"
                ) from None
        for spec, sock in bound:
            router = self.routers[spec.group]

            def factory(router: Router = router, port: int = spec.port) -> ClientSide:
                return ClientSide(self, router, port)

            self._servers.append(await loop.create_server(factory, sock=sock, backlog=BACKLOG))
            self.listening.append(spec)
        for g in self.config.groups:
            p = g.persistence
            if p.enabled:
                plen = mask_prefix_len(p.netmask)
                mask = (
                    f"/{plen}"
                    if plen is not None
                    else socket.inet_ntoa(p.netmask.to_bytes(4, "big"))
                )
                persist = f"persistence {p.timeout:g}s per {mask} (IPv6 /{p.ipv6_prefix})"
            else:
                persist = "persistence off"
            where = ", ".join(str(s) for s in self.listening if s.group == g.name)
            log.info(
                "group %s (mark %d): listening on %s; %s backends, scheduler %s, %s",
                g.name,
                g.mark,
                where,
                len(g.backends),
                g.scheduler,
                persist,
            )
        self._sweeper = loop.create_task(self._sweep())
        self.monitor.start()

    def close_connections(self, router: Router, backend: Backend) -> int:
        """Close every open connection of `backend` in `router`'s group; how many."""
        doomed = [
            c
            for c in self.live
            if c.router is router and c.route is not None and c.route.backend is backend
        ]
        for conn in doomed:
            conn.close_idle()
        return len(doomed)

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[object]]) -> None:
        await self.start()
        try:
            await shutdown_trigger()
        finally:
            await self.shutdown()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let open connections finish for up to `grace` seconds (the config's
        shutdown_timeout by default), then reset what is left."""
        if grace is None:
            grace = self.config.shutdown_timeout
        for srv in self._servers:
            srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.monitor.stop()
        if self.live:
            log.info(
                "stopped accepting; waiting up to %gs for %d connections", grace, len(self.live)
            )
            try:
                async with asyncio.timeout(grace):
                    await self.wait_quiet()
            except TimeoutError:
                log.info("closing %d connections still open after %gs", len(self.live), grace)
                for conn in list(self.live):
                    if not conn.lost:
                        reset(conn.transport)
                    if conn.peer is not None and not conn.peer.lost:
                        reset(conn.peer.transport)
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        log.info("stopped")

    # ------------------------------------------------------------------ idle timeout

    async def _sweep(self) -> None:
        """Close connections with no traffic for their group's idle_timeout.

        The relay only sets a flag per read; this loop turns flags into timestamps, so the hot
        path never touches a timer. Precision is one tick.
        """
        timeouts = [g.idle_timeout for g in self.config.groups if g.idle_timeout > 0]
        if not timeouts:
            return
        tick = min(1.0, max(0.02, min(timeouts) / 10))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in list(self.live):
                peer = conn.peer
                if conn.seen or (peer is not None and peer.seen):
                    conn.seen = False
                    if peer is not None:
                        peer.seen = False
                    conn.idle_since = now
                    continue
                limit = conn.router.spec.idle_timeout
                if (
                    limit > 0
                    and now - conn.idle_since >= limit
                    and conn.task is not None
                    and conn.task.done()
                ):
                    conn.close_idle()
