"""The balancer's lifecycle: start listeners, serve until told to stop, then drain and close; and
reload a new configuration in place.

`Runtime.serve(shutdown_trigger)` takes an awaitable to wait on instead of installing signal
handlers itself (the CLI wires SIGTERM/SIGINT to it; tests pass an Event), after hypercorn.
The server composes its rooms and hands each only what it needs: the data plane gets its
context (`DataPlane`), never the server; the listeners (`Listeners`) answer the data plane's
questions; the state file is `Pins`'; the read models are `stats`'. The admin API is not
imported here: a factory for it is given (`admin_factory`, set by `l4lb.balancer.Server`),
and the API reads the server through its own Protocol (`l4lb.admin.view`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..checks.monitor import HealthMonitor
from ..config import ConfigError, load_config
from ..config.describe import describe
from ..config.names import Answer, expand, names_in
from ..core.backends import Backend
from ..core.diff import changes as config_changes
from ..core.flowstats import UdpStats
from ..core.reconfigure import reconfigure
from ..core.routing import Router
from ..core.spec import AdminSpec, Config
from ..dataplane.accesslog import Writers, attach_writers
from ..dataplane.context import DataPlane
from ..dataplane.listeners import Where, listen_specs
from ..dataplane.transparent import has_net_admin, routing_problems
from . import stats
from .channel import Channel
from .errors import ReloadError, StartupError, UpgradeError
from .handform import HandoverError
from .handover import Takeover, Upgrade, handed_over
from .listening import RETIRE, Listeners
from .pair import Pair
from .pairsync import IdleSync
from .pins import Pins, steering
from .resolver import lookup
from .sharing import Share
from .successor import upgrade_argv

log = logging.getLogger("l4lb.server")

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


class AdminPlane(Protocol):
    """The admin API as the runtime starts and stops it (and an upgrade hands it over)."""

    async def start(self, sock: socket.socket | None = None, hold: bool = False) -> None: ...

    async def release(self) -> None: ...

    async def stop(self) -> None: ...

    def listening(self) -> socket.socket | None:
        """A duplicate of its listening socket (None: a Unix one, a worker's)."""

    def pause(self) -> None:
        """Stop accepting (the socket stays open for `resume`)."""

    async def resume(self) -> None: ...


AdminFactory = Callable[[Any, AdminSpec, "str | None"], AdminPlane]


class Runtime:
    admin_factory: ClassVar[AdminFactory | None] = None  # None: no admin API in this process
    # Loads the admin API's code (aiohttp: some hundreds of ms) ahead of a hand-over, so that
    # the clients the old process holds back do not wait for it
    admin_preload: ClassVar[Callable[[], None] | None] = None

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        *,
        inherited: dict[Where, socket.socket] | None = None,
        worker: int | None = None,
        admin_path: str | None = None,
        follower: bool = False,
        on_health: Callable[[str, str, bool, str], None] | None = None,
        takeover: Channel | None = None,
        sources: Sequence[tuple[int, Channel]] = (),
        before: int = 0,
    ) -> None:
        # The configuration as written (backends may be DNS names), and as applied: its names
        # expanded to what they resolve to (l4lb/config/names.py), all down until `start`
        # looks them up.
        self.written = config
        config = expand(config, {})
        self.config = config
        self.answers: dict[str, Answer] = {}  # the resolver's last answer for each name
        self.worker = worker
        self.admin_path = admin_path
        self.clock = clock
        self.rng = rng
        self.routers = {g.name: Router(g, clock, rng) for g in config.groups}
        store = None
        if config.affinity_store is not None:
            from ..dataplane.store import RedisStore  # redis loads only with a store

            store = RedisStore(config.affinity_store, lambda: self.routers)
        self.store = store
        self.plane = DataPlane(self.routers, store)
        self.listeners = Listeners(self.plane, self.routers, inherited)
        self.listeners.freebind = config.ha is not None
        ha, admin = config.ha, config.admin
        self.pair: Pair | None = None  # an HA pair's part (runtime/pair.py), started by `start`
        if ha is not None and admin is not None and admin.token_file is not None:
            self.pair = Pair(self, ha, admin.token_file)
            self.pair.idle = IdleSync(self.pair)
        self.udp_stats: Mapping[str, UdpStats] = self.listeners.udp_stats
        self.pins = Pins(self.routers, worker)
        # Workers: the leader checks and tells (`on_health`); followers take its verdicts.
        self.monitor = HealthMonitor(self.routers, self.plane.close_connections, rng, follower)
        self.on_health = on_health
        self.ready = False
        self.started_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.admin_refused: dict[str, int] = {}
        self.history = stats.new_history()
        self.access_logs: Writers = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self._admin: AdminPlane | None = None
        # Upgrades (runtime/handover.py): the hand-over this process takes over from, if it
        # was started by one; its own, by result; the last one's line, and whether one runs.
        # A worker whose number of siblings changed (`before` them) takes over from every old
        # worker (`sources`), keeping its share (runtime/handover.Share)
        self.takeover = Takeover(takeover) if takeover is not None else None
        if sources and self.worker is not None:
            share = Share(
                me=self.worker,
                workers=config.workers,
                sources=[i for i, _ in sources],
                pins=self.pins.resharded(config, before),
                steered=steering(config),
            )
            self.takeover = Takeover([c for _, c in sources], share)
        self.upgrades: dict[str, int] = {"ok": 0, "failed": 0}
        self.last_upgrade: dict[str, Any] | None = None
        self._upgrading = False
        self._following: asyncio.Task[None] | None = None  # the waves of the upgrade it came from

    # ------------------------------------------------------------------ read models

    def in_flight(self) -> dict[tuple[str, str], list[int]]:
        return stats.in_flight(self.plane.live)

    def flows_by_backend(self) -> dict[tuple[str, str], int]:
        return stats.flows_by_backend(self.listeners.udp_listeners())

    def flows_by_entry(self) -> dict[int, int]:
        return stats.flows_by_entry(self.listeners.udp_listeners())

    def sample(self) -> dict[str, Any]:
        return stats.sample(self.routers, self.in_flight())

    async def wait_quiet(self) -> None:
        """Return once no connection is open or being dialed."""
        await self.plane.wait_quiet()

    def reopen_logs(self) -> None:
        """SIGUSR1: the connection log files are opened again (logrotate)."""
        for writer in self.access_logs.values():
            writer.reopen()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.plane.attach(loop)
        self._warn_udp_descriptors()
        self._check_source()
        if self.config.kernel_marks is not None:
            check_fwmark_accept()
        if names_in(self.written):
            self.answers = await lookup(names_in(self.written))
            self._resolved(expand(self.written, self.answers))
        takeover = self.takeover
        if takeover is not None:  # everything the previous process serves, until its commit
            preload = type(self).admin_preload
            if self.config.admin is not None and preload is not None:
                preload()  # (before the hello: nobody waits on this process yet)
            await self._receive(takeover)
        specs = listen_specs(self.config)
        bound = self.listeners.bind_new(specs)
        self._set_bindings()
        if takeover is not None:
            for unwanted in takeover.listeners.values():  # (a port this configuration drops)
                unwanted.close()
            share = takeover.share
            restoring = self.pins.taken(takeover.pins, share.pins if share else None)
        else:  # (meanwhile, clients wait in the backlog; in a thread, so that signals are heard)
            restoring = await asyncio.to_thread(self.pins.index, self.config)
        await self.listeners.serve(bound, hold=takeover is not None)
        if takeover is not None and takeover.retiring:  # (old workers' sockets, for a while)
            await self.listeners.serve_retiring(takeover.retiring)
        restore = loop.create_task(restoring.run()) if restoring is not None else None
        if self.store is not None:
            await self.store.start()
        self._wire_health()
        self.monitor.start()
        self._tasks = [
            loop.create_task(self._sweep()),
            loop.create_task(stats.keep_history(self.history, self.sample)),
            loop.create_task(self._resolve_periodically()),
            loop.create_task(self._sweep_udp()),
        ]
        if restore is not None:  # the pins load while the listeners serve
            self._tasks.append(restore)
        if self.config.state_file:
            self._tasks.append(loop.create_task(self.pins.save_periodically(lambda: self.config)))
        await self._start_admin(hold=takeover is not None)  # (imports aiohttp: before a commit)
        if self.pair is not None:
            await self.pair.start()
        if takeover is not None:
            await self._commit(takeover)
            if self._admin is not None:
                await self._admin.release()
        self.takeover = None
        self.ready = True
        for g in self.config.groups:  # last, so that these lines mean "fully started"
            # (a worker's supervisor says it once for all of them)
            line = describe(self.config, self.listeners.listening, g.name)
            log.log(logging.DEBUG if self.worker is not None else logging.INFO, "%s", line)

    def _check_source(self, changed: set[str] | None = None) -> None:
        """For `source: client`: say at start (or at the reload that set it: the groups
        `changed`) whether this host can do it (the capability, and the way back for the
        answers, read from the kernel), and if not, mark the groups so that their failing dials
        are counted as this host's failures, not the backends'."""
        for g in self.config.groups:
            if g.source != "client" or (changed is not None and g.name not in changed):
                continue
            router = self.routers[g.name]
            if not has_net_admin():
                log.warning(
                    "group %s: source: client needs CAP_NET_ADMIN (IP_TRANSPARENT): every dial"
                    " will fail, counted as reason=source (systemd: AmbientCapabilities="
                    "CAP_NET_ADMIN; see docs/deployment.md)",
                    g.name,
                )
            v6 = any(":" in b.address for b in g.backends)
            problems = routing_problems(v6)
            if problems is None:
                log.info("group %s: source: client: cannot read the routing rules (no ip)", g.name)
            elif problems:
                router.source_ready = False
                log.warning(
                    "group %s: source: client: the backends' answers to clients cannot come back"
                    " to l4lb: %s. Dials will time out, counted as reason=source, not against"
                    " the backends (see docs/deployment.md)",
                    g.name,
                    "; ".join(problems),
                )
            else:
                router.source_ready = True
                log.info(
                    "group %s: source: client: backends see each client's own address (the"
                    " policy rule and local route are in place)",
                    g.name,
                )

    def _warn_udp_descriptors(self) -> None:
        udp = [g for g in self.config.groups if g.udp_ports]
        half = self.plane.budget
        if any(g.udp_max_flows == 0 for g in udp):
            log.info(
                "UDP flows: at most %d per group without udp_max_flows, half of the %d"
                " descriptors RLIMIT_NOFILE leaves (TCP connections keep the other half)",
                half,
                2 * half,
            )
        flows = sum(g.udp_max_flows for g in udp)
        if flows > half:
            log.warning(
                "udp_max_flows allows %d UDP flows, but they may hold half of the descriptors,"
                " about %d (a flow holds one): beyond that the longest idle flow gives way;"
                " raise LimitNOFILE or ulimit -n",
                flows,
                half,
            )

    async def _receive(self, takeover: Takeover) -> None:
        """Take what the previous process hands over (its listening sockets are then this
        one's, its pins, states, counters, connections and flows adopted once serving)."""
        try:
            await takeover.receive(self.routers, self.config.workers)
        except HandoverError as exc:
            takeover.fail(str(exc))
            raise StartupError(f"taking over from the previous process: {exc}") from None
        if self.worker is not None:
            # A worker serves the sockets its supervisor passed (the same ones, taken over by
            # the supervisor: its place in the reuseport group is theirs); the copies that came
            # with the hand-over are closed with the unwanted ones.
            return
        self.listeners.inherited = takeover.listeners
        self.listeners.partial = True

    async def _commit(self, takeover: Takeover) -> None:
        """Everything is ready here: on the old process's `commit`, serve and adopt."""
        try:
            await takeover.commit()
        except HandoverError as exc:
            raise StartupError(f"taking over from the previous process: {exc}") from None
        await self.listeners.release()
        line = await takeover.adopt(self)
        if self.listeners.retiring or self.listeners.settling:
            self.listeners.settling = True
            asyncio.get_running_loop().call_later(RETIRE, self._retire)
        self.last_upgrade = {"at": time.time(), "line": line}
        log.info("upgrade: %s", line)
        if takeover.waves:  # the connections come now, a wave at a time
            self._following = asyncio.get_running_loop().create_task(takeover.follow(self))

    def _retire(self) -> None:
        n = self.listeners.retire()
        if n:
            log.info("closed %d socket(s) that an upgrade's change of workers left here", n)

    @property
    def upgrading(self) -> bool:
        """An upgrade runs, given or taken (its waves still coming)."""
        return self._upgrading or (self._following is not None and not self._following.done())

    def admin_plane(self) -> AdminPlane | None:
        return self._admin

    async def upgrade(
        self,
        channel: Channel | None = None,
        barrier: Callable[[], Awaitable[None]] | None = None,
        others: Sequence[Channel] = (),
        workers: int | None = None,
    ) -> str:
        """Start the l4lb installed now on the configuration file as it is now, hand it
        everything, and exit (runtime/handover.py); what moved, in one line. UpgradeError
        (the old process serves on) when it cannot, or while another upgrade runs. A worker
        is given its successor's `channel` and the supervisor's `barrier` (workers/upgrade.py),
        and, when the number of workers changes (to `workers`), the `others` new workers."""
        if self.upgrading:
            raise UpgradeError("an upgrade is running already")
        if self.pair is not None and self.pair.busy:
            raise UpgradeError("an HA hand-over is running: upgrade once it is done")
        if self.takeover is not None or not self.ready:
            raise UpgradeError("this process is not serving yet")
        if self.listeners.settling:  # (they would close with this process, resetting a queue)
            raise UpgradeError(
                f"the last upgrade's retiring sockets are served for {RETIRE:g} s: try again then"
            )
        if self.worker is not None and channel is None:
            raise UpgradeError("a worker is upgraded by its supervisor, with the whole tree")
        self._upgrading = True
        try:
            how = Upgrade(
                self,
                upgrade_argv(),
                workers=self.config.workers if workers is None else workers,
                channel=channel,
                others=others,
                barrier=barrier,
            )
            line = await how.run()
        except UpgradeError as exc:
            self.upgrades["failed"] += 1
            log.error("upgrade failed; serving on: %s", exc)
            raise
        finally:
            self._upgrading = False
        log.info("upgrade: %s; this process exits", line)
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, handed_over)  # (once the API's answer is written)
        return line

    async def _start_admin(self, hold: bool = False) -> None:
        spec, factory = self.config.admin, type(self).admin_factory
        if spec is None or factory is None:
            return
        admin = factory(self, spec, self.admin_path)
        inherited = self.takeover.admin if self.takeover is not None else None
        try:
            await admin.start(inherited, hold)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {spec.host}:{spec.port} for the admin API: {exc.strerror or exc}"
            ) from None
        self._admin = admin
        if self.admin_path is None:
            log.info("admin API on %s", spec.url)

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
        if self.pair is not None:
            await self.pair.stop()
        self.listeners.close()
        for task in self._tasks:
            task.cancel()
        try:
            async with asyncio.timeout(5.0):
                await self.monitor.stop()
        except TimeoutError:  # a stuck check must not hold the shutdown
            log.warning("health checks did not stop within 5s; going on")
        live = self.plane.live
        if live:
            log.info("stopped accepting; waiting up to %gs for %d connections", grace, len(live))
            try:
                async with asyncio.timeout(grace):
                    await self.plane.wait_quiet()
            except TimeoutError:
                log.info("closing %d connections still open after %gs", len(live), grace)
                for conn in list(live):
                    conn.reset_all()
        try:
            async with asyncio.timeout(5.0):  # a client still sending its PROXY header, say
                await self.listeners.wait_closed()
        except TimeoutError:
            log.warning("listeners did not close within 5s; going on")
        self.listeners.serving.clear()
        if self.config.state_file:
            await self.pins.save(self.config)
        for writer in self.access_logs.values():
            writer.close()
        if self.store is not None:
            await self.store.stop()
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        log.info("stopped")

    def _set_bindings(self) -> None:
        """The listeners, the loop guard and the logs, for the routers as they are now."""
        self.listeners.set_bindings(listen_specs(self.config))
        tcp = {s.port for s in self.listeners.listening if s.proto == "tcp"}
        udp = {s.port for s in self.listeners.listening if s.proto == "udp"}
        self.plane.watch_loops(self.routers, tcp, udp, self.config.kernel_marks is not None)
        try:
            self.access_logs = attach_writers(self.routers.values(), self.access_logs, self.worker)
        except OSError as exc:
            raise StartupError(
                f"cannot open the access log {exc.filename}: {exc.strerror or exc}"
            ) from None

    # ------------------------------------------------------------------ reload

    async def reload_from_file(self) -> list[str]:
        """Re-read the configuration file and apply it; raises ReloadError."""
        if self.written.source == "<flags>":  # `l4lb run -l ... -b ...`: no file to re-read
            self.reloads_failed += 1
            log.error("reload refused: the configuration came from flags, not a file")
            raise ReloadError(["the configuration came from flags, not a file: nothing to re-read"])
        try:
            # (in a thread: the file, and the key and token files it names, may be slow or
            # not files at all; the relay goes on meanwhile)
            config = await asyncio.to_thread(load_config, self.config.source)
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
            self.monitor.note_reload(changes, time.time())
            return changes

    def _resolved(self, new: Config) -> None:
        """At start, before anything runs: the routers take the names' first answers."""
        for g in new.groups:
            reconfigure(self.routers[g.name], g, self.clock, self.rng)
        self.config = new
        for router in self.routers.values():
            for b in router.backends:
                if b.unresolved:
                    log.warning(
                        "group %s: backend %s is down: %s", router.name, b.name, b.unresolved
                    )

    async def _resolve_periodically(self) -> None:
        """Every `resolve_interval`, the names again; a changed answer is applied as a reload
        would apply it (backends matched by name: see l4lb/config/names.py)."""
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
        self.listeners.close_flipped(wanted)
        bound = self.listeners.bind_new(specs)
        changes: list[str] = []
        for g in new.groups:
            router = self.routers.get(g.name)
            if router is None:
                self.routers[g.name] = Router(g, self.clock, self.rng)
                changes.append(f"group {g.name} added")
            else:
                changes += [
                    f"group {g.name}: {c}" for c in reconfigure(router, g, self.clock, self.rng)
                ]
        for name in [n for n in self.routers if n not in {g.name for g in new.groups}]:
            del self.routers[name]  # its open connections keep their router and finish
            changes.append(f"group {name} removed")
        old, self.config = self.config, new
        self._set_bindings()
        was = {g.name: g.source for g in old.groups}
        self._check_source({g.name for g in new.groups if g.source != was.get(g.name)})
        await self.listeners.serve(bound)
        changes += self.listeners.close_unwanted(wanted)
        changes += [f"listening on {spec}" for spec, _ in bound]
        restart = ("admin", "affinity_store", "workers", "ha")
        for change in config_changes(
            old, new, skip=("groups", "source", "warnings", "kernel_marks", "files")
        ):
            later = change.split(" ", 1)[0].split(".", 1)[0] in restart
            changes.append(
                change + (" (takes effect at the next upgrade or restart)" if later else "")
            )
        if self.store is not None:
            self.store.routers_changed()
        self._wire_health()
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

    # ------------------------------------------------------------------ sweeps

    async def _sweep_udp(self) -> None:
        """End UDP flows idle past their group's udp_idle_timeout (`UdpListener.sweep`)."""
        while True:
            timeouts = [g.udp_idle_timeout for g in self.config.groups if g.udp_ports]
            tick = min(1.0, max(0.02, min(timeouts) / 10)) if timeouts else 1.0
            await asyncio.sleep(tick)
            now = time.monotonic()
            for listener in self.listeners.udp_listeners():
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
            for conn in list(self.plane.live):
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
