"""The balancer's lifecycle: start listeners, serve until told to stop, then drain and close; and
reload a new configuration in place.

`Server.serve(shutdown_trigger)` takes an awaitable to wait on instead of installing signal
handlers itself (the CLI wires SIGTERM/SIGINT to it; tests pass an Event), after hypercorn.
Live connections are tracked in a set, since uvloop's server cannot close its clients.

Listeners are keyed by (address, port, protocol) and each accept (or a UDP listener's new
flow) looks up the group and service port it serves in `_bindings`, so a reload that keeps a
port keeps its socket open and never refuses a connection; only new ports are bound (before
anything else changes) and removed ones closed. UDP listeners and their flows are `udp.py`'s.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import random
import resource
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checks.monitor import HealthMonitor
from ..config import (
    Config,
    ConfigError,
    GroupPorts,
    compact_ports,
    is_local_address,
    load_config,
)
from ..config import changes as config_changes
from ..config.names import Answer, expand, names_in
from ..core.backends import Backend
from ..core.keys import V6_TAG, format_netmask
from ..core.reuseport import steer
from ..core.routing import RESOURCE_ERRNOS, Router
from ..core.throttle import Throttle, held_note
from ..dataplane.accesslog import AccessLog
from ..dataplane.dialer import Deadlines, SlotQueue
from ..dataplane.listeners import (
    BACKLOG,
    MARKS,
    ListenSpec,
    Where,
    bind,
    close_all,
    listen_specs,
    steering_masks,
)
from ..dataplane.relay import ClientSide, MarkedClientSide, ProxyClientSide
from ..dataplane.udp import UdpListener, UdpStats
from . import statefile
from .resolver import lookup

if TYPE_CHECKING:
    from ..dataplane.store import RedisStore

log = logging.getLogger("l4lb.server")

_throttle = Throttle()
HISTORY_PERIOD = 5.0  # seconds between samples of the affinity table sizes
# Descriptors kept for what is not a relayed connection: listeners, the admin API and its
# clients, health checks, the shared store, the state file, logs.
FD_RESERVE = 64


def connection_budget() -> int:
    """How many relayed connections (two descriptors each) fit under RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - FD_RESERVE) // 2)


HISTORY_LENGTH = 720  # one hour of samples


class StartupError(Exception):
    """The balancer cannot start (a port it cannot bind, say); the message is one line."""


class ReloadError(Exception):
    """A reload was refused and nothing changed; `lines` say why."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"


def check_fwmark_accept() -> None:
    """Accepted sockets carry their SYN's mark only with this sysctl: say so, or refuse."""
    try:
        value = Path(FWMARK_ACCEPT).read_text(encoding="ascii").strip()
    except OSError:
        raise StartupError(
            f"kernel_marks needs Linux's {FWMARK_ACCEPT}, which this system does not have"
        ) from None
    if value != "1":
        raise StartupError(
            "kernel_marks needs net.ipv4.tcp_fwmark_accept=1 (sysctl -w"
            " net.ipv4.tcp_fwmark_accept=1 in the balancer's network namespace);"
            " without it every connection carries mark 0"
        )


def describe(config: Config, listening: list[ListenSpec], group: str) -> str:
    """The start-up line of one group: where it listens, its backends and its persistence."""
    g = next(g for g in config.groups if g.name == group)
    p = g.persistence
    if p.enabled:
        mask = format_netmask(p.netmask)
        persist = f"persistence {p.timeout:g}s per {mask} (IPv6 /{p.ipv6_prefix})"
    else:
        persist = "persistence off"
    hosts: dict[str, tuple[list[int], list[int]]] = {}
    for s in listening:
        if s.group == g.name:
            tcp, udp = hosts.setdefault(f"[{s.host}]" if ":" in s.host else s.host, ([], []))
            (udp if s.proto == "udp" else tcp).append(s.port)
    where = "; ".join(
        f"{h} port(s) {GroupPorts(tuple(tcp), tuple(udp)).text()}"
        for h, (tcp, udp) in hosts.items()
    )
    km = config.kernel_marks
    if g.kernel_mark is not None and km is not None:
        covered = compact_ports(g.ports)
        where = f"firewall mark {g.kernel_mark} via {km.host}:{km.port} (ports {covered})"
    return (
        f"group {g.name} (mark {g.mark}): listening on {where}; {len(g.backends)} backends, "
        f"scheduler {g.scheduler}, {persist}"
    )


class Server:
    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        inherited: dict[Where, socket.socket] | None = None,
        worker: int | None = None,
        admin_path: str | None = None,
        follower: bool = False,
        on_health: Callable[[str, str, bool, str], None] | None = None,
    ) -> None:
        # The configuration as written (backends may be DNS names), and as applied: its names
        # expanded to what they resolve to (l4lb/names.py), all down until `start` looks them up.
        self.written = config
        config = expand(config, {})
        self.config = config
        self.answers: dict[str, Answer] = {}  # the resolver's last answer for each name
        # As a worker: the listening sockets the supervisor opened, by (address, port); a
        # worker never binds one itself, since its place in the reuseport group matters.
        self.inherited = inherited
        self.worker = worker
        self.admin_path = admin_path
        self.clock = clock
        self.rng = rng
        self.routers = {g.name: Router(g, clock, rng) for g in config.groups}
        self.live: set[ClientSide] = set()
        self.slots = SlotQueue()
        self.deadlines = Deadlines()  # the dials' connect deadlines, one sweep for all
        self.store: RedisStore | None = None
        if config.affinity_store is not None:
            from ..dataplane.store import RedisStore  # redis loads only when a store is configured

            self.store = RedisStore(config.affinity_store, lambda: self.routers)
        # Workers: the leader checks and tells (`on_health`); followers take its verdicts.
        self.monitor = HealthMonitor(self.routers, self.close_connections, rng, follower)
        self.on_health = on_health
        self.listening: list[ListenSpec] = []
        self.ready = False
        self.started_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.admin_refused: dict[str, int] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)
        self._bindings: dict[Where, tuple[Router, int]] = {}
        self.udp_stats: dict[str, UdpStats] = {}  # per group, kept across reloads
        self.by_mark: dict[int, Router] = {}  # kernel_mark -> group, for the marks listener
        self.unmatched_marks = 0  # connections whose mark no group claims
        # Connections refused for want of descriptors, by errno name (see `refuse_for_fds`)
        self.accept_errors: dict[str, int] = {}
        # Relayed TCP connections that fit in the descriptors; an open UDP flow holds one
        # descriptor, half a connection's, so `max_live` is the budget less the flows' share.
        self.budget = connection_budget()
        self.max_live = self.budget
        self.udp_open = 0  # UDP flows open, all groups
        # Local (address, port) of open dials to loopback backends: a client arriving from one
        # of them is l4lb itself (`ClientSide.looped`).
        self.outgoing: dict[tuple[str, int], tuple[Router, Backend]] = {}
        self.loop_watch = False  # some backend could lead back to us (`_watch_loops`)
        self.access_logs: dict[tuple[str, str], AccessLog] = {}  # log writers, by path and format
        self.inbound: dict[tuple[str, int], ClientSide] = {}  # open clients from loopback
        self.loops = 0
        self._listeners: dict[Where, tuple[ListenSpec, asyncio.AbstractServer | UdpListener]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._quiet: asyncio.Event | None = None
        self._reload_lock = asyncio.Lock()
        self._admin: object | None = None
        self.loop_time: Callable[[], float] = time.monotonic  # the loop's clock, from `start`
        self.loop: asyncio.AbstractEventLoop  # the loop it runs on, set by `start`

    # ------------------------------------------------------------------ connection tracking

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

    def track(self, conn: ClientSide) -> None:
        conn.started = conn.idle_since = self.loop_time()
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

    def close_connections(self, router: Router, backend: Backend) -> int:
        """Close every open connection of `backend` in `router`'s group; how many."""
        doomed = [
            c
            for c in self.live
            if c.router is router and c.route is not None and c.route.backend is backend
        ]
        for conn in doomed:
            conn.ended("backend_down")
            conn.close()
        return len(doomed)

    # ------------------------------------------------------------------ listeners

    def _bind_new(self, specs: list[ListenSpec]) -> list[tuple[ListenSpec, socket.socket]]:
        """Bind every spec not bound yet; all or nothing."""
        bound: list[tuple[ListenSpec, socket.socket]] = []
        for spec in specs:
            current = self._listeners.get(spec.where)
            if current is not None and current[0].v6only == spec.v6only:
                continue
            if self.inherited is not None:
                sock = self.inherited.pop(spec.where, None)
                if sock is None:
                    close_all(s for _, s in bound)
                    raise StartupError(f"the supervisor passed no socket for {spec}")
                bound.append((spec, sock))
                continue
            try:
                bound.append((spec, bind(spec)))
            except OSError as exc:
                close_all(s for _, s in bound)
                raise StartupError(
                    f"cannot listen on {spec} for group {spec.group!r}: {exc.strerror or exc}"
                ) from None
        return bound

    async def _serve_sockets(self, bound: list[tuple[ListenSpec, socket.socket]]) -> None:
        loop = asyncio.get_running_loop()
        bindings = self._bindings
        for spec, sock in bound:
            where = spec.where
            if spec.proto == "udp":
                self._listeners[where] = (spec, UdpListener(self, spec, sock))
                continue

            if spec.group == MARKS:

                def marked() -> ClientSide:
                    return MarkedClientSide(self)

                self._listeners[where] = (
                    spec,
                    await loop.create_server(marked, sock=sock, backlog=BACKLOG),
                )
                continue

            def factory(where: Where = where) -> ClientSide:
                router, service_port = bindings[where]
                if router.proxy_trusted is not None:
                    return ProxyClientSide(self, router, service_port)
                return ClientSide(self, router, service_port)

            srv = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
            self._listeners[where] = (spec, srv)

    def _set_bindings(self, specs: list[ListenSpec]) -> None:
        self._bindings.clear()
        for spec in specs:
            if spec.group != MARKS:
                self._bindings[spec.where] = (self.routers[spec.group], spec.port)
                if spec.proto == "udp":
                    self.udp_stats.setdefault(spec.group, UdpStats())
        self.by_mark = {
            r.spec.kernel_mark: r for r in self.routers.values() if r.spec.kernel_mark is not None
        }
        self.listening = specs
        self._watch_loops()
        self._open_logs()

    def flows_changed(self, delta: int) -> None:
        """A UDP flow opened (+1) or ended (-1): the descriptors left for TCP move with it."""
        self.udp_open += delta
        self.max_live = self.budget - (self.udp_open + 1) // 2

    def descriptors_full(self) -> bool:
        """No descriptor left for one more UDP flow (beside the open TCP connections')."""
        return self.udp_open + 2 * len(self.live) >= 2 * self.budget

    def _warn_udp_descriptors(self) -> None:
        flows = sum(g.udp_max_flows for g in self.config.groups if g.udp_ports)
        if flows > 2 * self.budget:
            log.warning(
                "udp_max_flows allows %d UDP flows, but the descriptor limit leaves room for"
                " about %d (a flow holds one): beyond that the longest idle flow gives way;"
                " raise LimitNOFILE or ulimit -n",
                flows,
                2 * self.budget,
            )

    def udp_binding(self, spec: ListenSpec) -> tuple[Router, int, UdpStats] | None:
        """The group, service port and counters a UDP listener's new flow belongs to."""
        bound = self._bindings.get(spec.where)
        if bound is None:
            return None
        router, port = bound
        return router, port, self.udp_stats[router.name]

    def udp_listeners(self) -> list[UdpListener]:
        return [x for _, x in self._listeners.values() if isinstance(x, UdpListener)]

    def evict_udp(self, group: str) -> bool:
        """The group is at udp_max_flows (or the descriptors are all taken): its flow idle
        longest goes. False if it has none."""
        candidates = [
            (oldest, i, x)
            for i, x in enumerate(self.udp_listeners())
            if x.spec.group == group and (oldest := x.oldest()) is not None
        ]
        for _, _, listener in sorted(candidates, key=lambda c: (c[0], c[1])):
            if listener.evict_oldest():
                return True
        return False

    def _open_logs(self) -> None:
        """One writer per log path and format, shared by the groups that log there; one no group
        uses any more is closed. (Two formats to one path: each group's lines in its own.)"""
        wanted: dict[tuple[str, str], AccessLog] = {}
        for router in self.routers.values():
            spec = router.spec.access_log
            if spec is None:
                router.log = None
                continue
            where = (spec.path, spec.format)
            writer = wanted.get(where) or self.access_logs.get(where)
            if writer is None:
                try:
                    writer = AccessLog(spec, self.worker)
                except OSError as exc:
                    raise StartupError(
                        f"cannot open the access log {spec.path}: {exc.strerror or exc}"
                    ) from None
            writer.forget()  # the backends its cached texts name may have changed
            wanted[where] = writer
            router.log = (writer, spec)
        for where, writer in self.access_logs.items():
            if where not in wanted:
                writer.close()
        self.access_logs = wanted

    def reopen_logs(self) -> None:
        """SIGUSR1: the connection log files are opened again (logrotate)."""
        for writer in self.access_logs.values():
            writer.reopen()

    def _watch_loops(self) -> None:
        """Which backends a dial could come back to us from: a local address with one of our
        listening ports (`l4lb check` refuses those, but a reload's or an inherited config may
        not have been checked here), or any local one when kernel marks REDIRECT traffic to us.
        Only their dials are remembered, and clients compared with them."""
        ports = {s.port for s in self.listening}
        redirect = self.config.kernel_marks is not None
        local: dict[str, bool] = {}
        watch = False
        for router in self.routers.values():
            for b in router.all_backends():
                ours = not b.unresolved and (
                    redirect or any(b.port_for(p) in ports for p in router.spec.ports)
                )
                if ours and b.address not in local:
                    local[b.address] = is_local_address(b.address)
                b.may_loop = ours and local[b.address]
                watch = watch or b.may_loop
        self.loop_watch = watch

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.loop_time = loop.time
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(self._loop_errors)
        self.budget = self.max_live = connection_budget()
        self._warn_udp_descriptors()
        if self.config.kernel_marks is not None:
            check_fwmark_accept()
        if names_in(self.written):
            self.answers = await lookup(names_in(self.written))
            self._resolved(expand(self.written, self.answers))
        specs = listen_specs(self.config)
        bound = self._bind_new(specs)
        self._set_bindings(specs)
        await self._serve_sockets(bound)
        self._load_state()
        if self.store is not None:
            await self.store.start()
        self._wire_health()
        self.monitor.start()
        self._tasks = [
            loop.create_task(self._sweep()),
            loop.create_task(self._sample()),
            loop.create_task(self._resolve_periodically()),
            loop.create_task(self._sweep_udp()),
        ]
        if self.config.state_file:
            self._tasks.append(loop.create_task(self._save_periodically()))
        await self._start_admin()
        self.ready = True
        for g in self.config.groups:  # last, so that these lines mean "fully started"
            # (a worker's supervisor says it once for all of them)
            log.log(
                logging.DEBUG if self.worker is not None else logging.INFO,
                "%s",
                self._describe(g.name),
            )

    async def _start_admin(self) -> None:
        if self.config.admin is None:
            return
        from ..admin.api import AdminServer  # aiohttp loads only when the admin API is configured

        admin = AdminServer(self, self.config.admin, self.admin_path)
        try:
            await admin.start()
        except OSError as exc:
            where = f"{self.config.admin.host}:{self.config.admin.port}"
            raise StartupError(
                f"cannot listen on {where} for the admin API: {exc.strerror or exc}"
            ) from None
        self._admin = admin
        if self.admin_path is None:
            log.info("admin API on %s", self.config.admin.url)

    def _describe(self, group: str) -> str:
        return describe(self.config, self.listening, group)

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
        self.ready = False
        for _, srv in self._listeners.values():
            srv.close()
        for task in self._tasks:
            task.cancel()
        try:
            async with asyncio.timeout(5.0):
                await self.monitor.stop()
        except TimeoutError:  # a stuck check must not hold the shutdown
            log.warning("health checks did not stop within 5s; going on")
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
                    conn.reset_all()
        try:
            async with asyncio.timeout(5.0):  # a client still sending its PROXY header, say
                for _, srv in self._listeners.values():
                    await srv.wait_closed()
        except TimeoutError:
            log.warning("listeners did not close within 5s; going on")
        self._listeners.clear()
        if self.config.state_file:
            await self._save_state()
        for writer in self.access_logs.values():
            writer.close()
        if self.store is not None:
            await self.store.stop()
        if self._admin is not None:
            await self._admin.stop()  # type: ignore[attr-defined]
            self._admin = None
        log.info("stopped")

    # ------------------------------------------------------------------ reload

    async def reload_from_file(self) -> list[str]:
        """Re-read the configuration file and apply it; raises ReloadError."""
        if self.written.source == "<flags>":  # `l4lb run -l ... -b ...`: no file to re-read
            self.reloads_failed += 1
            log.error("reload refused: the configuration came from flags, not a file")
            raise ReloadError(["the configuration came from flags, not a file: nothing to re-read"])
        try:
            config = load_config(self.config.source)
        except ConfigError as exc:
            self.reloads_failed += 1
            for line in exc.lines:
                log.error("reload refused: %s", line)
            raise ReloadError(exc.lines) from None
        except Exception as exc:  # a loader bug: still one refused, counted reload
            self.reloads_failed += 1
            log.exception("reload refused: the configuration could not be loaded")
            raise ReloadError([f"{self.config.source}: cannot be loaded: {exc!r}"]) from None
        return await self.apply(config)

    async def apply(self, new: Config) -> list[str]:
        """Apply a validated configuration without dropping a connection: kept ports keep their
        sockets, backends are matched by name. All or nothing: on a port that cannot be bound,
        nothing changes. Returns what changed."""
        async with self._reload_lock:
            try:
                answers = await lookup(names_in(new)) if names_in(new) else {}
                changes = await self._apply(expand(new, answers))
            except StartupError as exc:
                self.reloads_failed += 1
                log.error("reload refused: %s", exc)
                raise ReloadError([str(exc)]) from None
            self.written, self.answers = new, answers
            self.reloads_ok += 1
            log.info("reloaded %s: %s", new.source, "; ".join(changes) or "no changes")
            return changes

    def _resolved(self, new: Config) -> None:
        """At start, before anything runs: the routers take the names' first answers."""
        for g in new.groups:
            self.routers[g.name].reconfigure(g, self.clock, self.rng)
        self.config = new
        for router in self.routers.values():
            for b in router.backends:
                if b.unresolved:
                    log.warning(
                        "group %s: backend %s is down: %s", router.name, b.name, b.unresolved
                    )

    async def _resolve_periodically(self) -> None:
        """Every `resolve_interval`, the names again; a changed answer is applied as a reload
        would apply it (backends matched by name: see l4lb/names.py)."""
        while True:
            await asyncio.sleep(self.config.resolve_interval)
            names = names_in(self.written)
            if not names:
                continue
            answers = await lookup(names)
            async with self._reload_lock:
                new = expand(self.written, answers)
                if new.groups == self.config.groups:
                    continue
                try:
                    changes = await self._apply(new)
                except StartupError as exc:  # cannot happen (the same listeners), but say so
                    log.error("cannot apply what the backends' names resolve to: %s", exc)
                    continue
                self.answers = answers
                log.info("backends' names resolved anew: %s", "; ".join(changes))

    async def _apply(self, new: Config) -> list[str]:
        specs = listen_specs(new)
        wanted = {s.where: s for s in specs}
        # v6-only flips need the old socket gone first: the one change that cannot be seamless.
        for where, (spec, srv) in list(self._listeners.items()):
            if where in wanted and wanted[where].v6only != spec.v6only:
                srv.close()
                del self._listeners[where]
        bound = self._bind_new(specs)
        changes: list[str] = []
        for g in new.groups:
            router = self.routers.get(g.name)
            if router is None:
                self.routers[g.name] = Router(g, self.clock, self.rng)
                changes.append(f"group {g.name} added")
            else:
                changes += [
                    f"group {g.name}: {c}" for c in router.reconfigure(g, self.clock, self.rng)
                ]
        for name in [n for n in self.routers if n not in {g.name for g in new.groups}]:
            del self.routers[name]  # its open connections keep their router and finish
            changes.append(f"group {name} removed")
        self._set_bindings(specs)
        await self._serve_sockets(bound)
        for where, (_spec, srv) in list(self._listeners.items()):
            if where not in wanted:
                srv.close()  # stops accepting; its connections carry on
                del self._listeners[where]
                changes.append(f"stopped listening on {_spec}")
        changes += [f"listening on {spec}" for spec, _ in bound]
        restart = ("admin", "affinity_store", "workers")
        for change in config_changes(
            self.config, new, skip=("groups", "source", "warnings", "kernel_marks")
        ):
            later = change.split(" ", 1)[0].split(".", 1)[0] in restart
            changes.append(change + (" (takes effect at the next restart)" if later else ""))
        if self.store is not None:
            self.store.routers_changed()
        self._wire_health()
        self.config = new
        self._watch_loops()  # again: kernel_marks may have come or gone with the file
        await self.monitor.restart()
        return changes

    def _wire_health(self) -> None:
        tell = self.on_health
        if tell is None:
            return
        for name, router in self.routers.items():

            def hook(b: Backend, healthy: bool, reason: str, group: str = name) -> None:
                tell(group, b.name, healthy, reason)

            router.health_hook = hook

    # ------------------------------------------------------------------ state file

    @property
    def state_path(self) -> str | None:
        """Each worker keeps the pins of its own clients in a file of its own."""
        path = self.config.state_file
        return f"{path}.{self.worker}" if path and self.worker is not None else path

    def _load_state(self) -> None:
        path = self.config.state_file
        if not path:
            return
        if self.worker is None:
            sources = [path]
        else:
            # Every worker's file and a single process's: the pins of this worker's clients
            # are in any of them when `workers` changed since they were written.
            sources = [path, *sorted(glob.glob(glob.escape(path) + ".[0-9]*"))]
        found: list[tuple[str, dict[str, Any]]] = []
        for source in sources:
            try:
                data = statefile.read(source)
            except statefile.StateFileError as exc:
                log.warning("ignoring the state file: %s", exc)
                continue
            if data is not None:
                found.append((source, data))
        if not found:
            log.info("state file %s does not exist yet", self.state_path)
            return
        found.sort(key=lambda f: -float(f[1].get("saved_at", 0) or 0))  # newest first
        keep = self._mine() if self.worker is not None else None
        for source, data in found:
            try:
                loaded, dropped = statefile.restore(self.routers, data, keep)
            except statefile.StateFileError as exc:
                log.warning("ignoring the state file: %s", exc)
                continue
            log.info("state file %s: restored %d pins, dropped %d", source, loaded, dropped)

    def _mine(self) -> Callable[[str, int], bool]:
        """Whether a group's key is steered to this worker (reuseport.steer, as the kernel)."""
        masks: dict[str, tuple[int, int] | None] = {}
        for g in self.config.groups:
            listener = MARKS if g.kernel_mark is not None else g.name
            masks[g.name] = steering_masks(self.config, ListenSpec(listener, "", 0, False))
        n, me = self.config.workers, self.worker

        def keep(group: str, key: int) -> bool:
            m = masks.get(group)
            if m is None:
                return me == 0  # not steered: one worker takes them
            packed = (key ^ V6_TAG).to_bytes(16, "big") if key & V6_TAG else key.to_bytes(4, "big")
            return steer(packed, m[0], m[1], n) == me

        return keep

    async def _save_state(self) -> None:
        path = self.state_path
        if not path:
            return
        data = statefile.snapshot(self.routers)
        try:
            await asyncio.to_thread(statefile.write, path, data)
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", path, exc.strerror or exc)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.state_interval)
            await self._save_state()

    # ------------------------------------------------------------------ background

    def in_flight(self) -> dict[tuple[str, str], list[int]]:
        """(group, backend) -> [bytes in, bytes out] of the connections still open, so that
        long transfers show as they flow."""
        out: dict[tuple[str, str], list[int]] = {}
        for conn in self.live:
            route = conn.route
            if route is not None and route.backend is not None:
                acc = out.setdefault((conn.router.name, route.backend.name), [0, 0])
                acc[0] += conn.nbytes
                acc[1] += conn.peer.nbytes if conn.peer is not None else 0
        return out

    def flows_by_backend(self) -> dict[tuple[str, str], int]:
        """(group, backend) -> UDP flows open (for the API, not the hot path)."""
        out: dict[tuple[str, str], int] = {}
        for listener in self.udp_listeners():
            for flow in listener.flows.values():
                if flow.backend is not None:
                    k = (flow.router.name, flow.backend.name)
                    out[k] = out.get(k, 0) + 1
        return out

    def flows_by_entry(self) -> dict[int, int]:
        """id(affinity entry) -> UDP flows holding it (the rest of its references are TCP)."""
        out: dict[int, int] = {}
        for listener in self.udp_listeners():
            for flow in listener.flows.values():
                entry = flow.route.entry
                if entry is not None:
                    out[id(entry)] = out.get(id(entry), 0) + 1
        return out

    def sample(self) -> dict[str, Any]:
        """One point of the status page's history: per group the table size and counters, per
        backend its counters and state (the page makes rates of consecutive samples)."""
        flowing = self.in_flight()
        groups: dict[str, Any] = {}
        backends: dict[str, Any] = {}
        for name, router in self.routers.items():
            table = router.table
            if table is not None:
                table.expire()
            st = router.stats
            g_in = g_out = 0
            for b in router.all_backends():
                live_in, live_out = flowing.get((name, b.name), (0, 0))
                b_in, b_out = b.bytes_in + live_in, b.bytes_out + live_out
                g_in, g_out = g_in + b_in, g_out + b_out
                backends[f"{name}/{b.name}"] = {
                    "connections": b.connections,
                    "active": b.active,
                    "bytes_in": b_in,
                    "bytes_out": b_out,
                    "failures": b.connect_failures,
                }
            groups[name] = {
                "entries": len(table) if table is not None else 0,
                "accepted": st.accepted,
                "bytes_in": g_in,
                "bytes_out": g_out,
            }
        return {
            "time": time.time(),
            "entries": {g: v["entries"] for g, v in groups.items()},
            "groups": groups,
            "backends": backends,
        }

    async def _sample(self) -> None:
        """The last hour, kept here so that a freshly opened status page shows it."""
        while True:
            self.history.append(self.sample())
            await asyncio.sleep(HISTORY_PERIOD)

    async def _sweep_udp(self) -> None:
        """End UDP flows idle past their group's udp_idle_timeout (`UdpListener.sweep`)."""
        while True:
            timeouts = [g.udp_idle_timeout for g in self.config.groups if g.udp_ports]
            tick = min(1.0, max(0.02, min(timeouts) / 10)) if timeouts else 1.0
            await asyncio.sleep(tick)
            now = time.monotonic()
            for listener in self.udp_listeners():
                listener.sweep(now)

    async def _sweep(self) -> None:
        """Close connections with no traffic for their group's idle_timeout.

        The relay only sets a flag per read; this loop turns flags into timestamps, so the hot
        path never touches a timer. Precision is one tick.
        """
        loop = asyncio.get_running_loop()
        while True:
            timeouts = [g.idle_timeout for g in self.config.groups if g.idle_timeout > 0]
            tick = min(1.0, max(0.02, min(timeouts) / 10)) if timeouts else 1.0
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
                if limit > 0 and now - conn.idle_since >= limit and conn.peer is not None:
                    conn.ended("idle_timeout")
                    conn.close()
