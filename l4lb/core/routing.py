"""The routing decision for one group: affinity first, then the scheduler, then failover.

Theory of operation
-------------------
A connection's life, as the router sees it:

1. `begin(key)` takes a reference on the key's affinity entry (or none, when persistence is off
   or the table is full of busy entries) and remembers the backend it was pinned to.
2. `next_backend(route)` gives the backend to dial:
   - while the group has lost its quorum and has a sorry server: the sorry server, never pinned;
   - the pinned backend, if it still accepts pinned clients (up, draining, or inhibited) and
     has a free slot. If it is full and the group has a `queue_timeout`, it returns None with
     `route.wait_for` set: the caller waits for a slot, then asks again (once). A connection
     that finds its backend still full goes to the scheduler's pick, but the pin stays;
   - with `on_up: return`, a client moved away from a failed backend goes back to it once it is
     up again;
   - otherwise the scheduler's pick among the backends not yet tried. A new entry is pinned to
     it right away, so a second connection of the same client arriving mid-dial follows it.
   After as many attempts as there are backends, it gives None: the client is closed.
3. `connected(route, backend)` confirms the pin. If the entry pointed elsewhere before this
   connection, that is a re-pin, counted by its reason.
4. `failed(route, backend)` records a refused or timed-out dial; `passive_failures` of them in a
   row mark the backend down at once (the passive check).
5. `finish(route)` releases the entry (starting its timeout when it was the last connection)
   and the backend's slot.

With a shared affinity store, a new pin (step 2 with no usable pin) is marked `route.fresh`;
the dialer has the store settle it before dialing, and the store may `swap` the dial to the pin
another instance made, or to `consistent(key)`, the hash every instance computes alike, when
the store cannot answer in time.

A pinned backend that is unavailable is never waited on: the connection is rescheduled at
once and the entry re-pinned to whichever backend accepts it. State changes (health verdicts,
operator states, quorum) go through `set_health` / `set_admin`, which emit `Event`s to
`listener`. Pure logic, no I/O.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection

from .affinity import AffinityTable, Entry
from .backends import Backend, State
from .diff import changes as config_changes
from .health import Event, Quorum
from .histogram import Histogram
from .keys import Keyer, make_keyer, make_matcher
from .limits import ClientLimits
from .quiclb import CHOSEN, OTHER, SHORT, Codec, destination_cid
from .record import LogSink, Record, Routed, unrouted
from .schedulers import Scheduler, make_scheduler, rendezvous
from .spec import BackendSpec, GroupSpec

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _trusted(spec: GroupSpec) -> Callable[[str], bool] | None:
    """Which peers may send a PROXY header, when the group takes them."""
    return make_matcher(list(spec.accept_proxy.trusted)) if spec.accept_proxy is not None else None


def _admits(spec: GroupSpec) -> Callable[[str], bool] | None:
    """The group's access lists as one test of a client host (None: no list, everyone in):
    a denied network is refused, then an allow list, when there is one, must match."""
    if not spec.allow and not spec.deny:
        return None
    deny = make_matcher(list(spec.deny)) if spec.deny else None
    allow = make_matcher(list(spec.allow)) if spec.allow else None

    def admits(host: str) -> bool:
        if deny is not None and deny(host):
            return False
        return allow is None or allow(host)

    return admits


def _checked(spec: GroupSpec) -> frozenset[str]:
    return frozenset(
        b.name for b in spec.backends if (b.health_check or spec.health_check) is not None
    )


def reached(
    group: str,
    port: int,
    affinity: str,
    route: Route,
    backend: Backend,
    backend_port: int,
    *,
    udp: bool = False,
) -> Routed:
    """The `Routed` of a connection or flow of `group` that reached `backend` on its
    `backend_port` for service `port` (`affinity`: what `Router.connected` said; for `cid`,
    the reason's place holds the server ID that chose the backend)."""
    return (
        group,
        port,
        affinity,
        backend.server_id if affinity == "cid" else route.reason,
        backend.name,
        backend.address,
        backend_port,
        len(route.tried),
        udp,
    )


class GroupStats:
    """Plain counters for one group, read at scrape time (never labelled per connection)."""

    __slots__ = (
        "accepted",
        "client_limit",
        "connect",
        "connect_failures",
        "denied",
        "descriptors",
        "duration",
        "failed_refused",
        "failed_timeout",
        "no_backend",
        "rejected",
        "repins_failed",
        "repins_returned",
        "repins_unavailable",
        "sorry",
        "source",
        "unpinned",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0  # clients refused before routing (an address we could not key)
        self.client_limit = 0  # clients refused over their network's client_limits
        self.denied = 0  # clients refused by the group's allow and deny lists
        self.source = 0  # dials that could not come from `source` (this host's setup)
        self.no_backend = 0  # connections closed because no backend accepted them
        self.connect_failures = 0  # single dial attempts that were refused or timed out
        self.descriptors = 0  # connections given up: no descriptor left to dial with
        self.failed_refused = 0
        self.failed_timeout = 0  # the rest of connect_failures are other socket errors
        self.connect = Histogram(CONNECT_BUCKETS)  # time to connect to a backend
        self.duration = Histogram(DURATION_BUCKETS)  # connections, from accept to close
        self.repins_unavailable = 0  # the pinned backend was down, disabled or removed
        self.repins_failed = 0  # the pinned backend refused or timed out
        self.repins_returned = 0  # on_up: return brought a client back
        self.unpinned = 0  # connections routed without a pin because the table was full
        self.sorry = 0  # connections sent to the sorry server

    @property
    def repins(self) -> int:
        return self.repins_unavailable + self.repins_failed + self.repins_returned


class Route:
    __slots__ = (
        "backend",
        "entry",
        "fresh",
        "key",
        "pinned",
        "queued",
        "reason",
        "shared",
        "steered",
        "tried",
        "wait_for",
    )

    def __init__(self, key: int, entry: Entry[Backend] | None, pinned: Backend | None) -> None:
        self.key = key
        self.entry = entry
        self.pinned = pinned  # the backend the entry held when this connection arrived
        # A new pin chosen and not yet settled with the shared table (when there is one), and
        # the pin it replaces there ("" for a client new to this process).
        self.fresh = False
        self.shared = pinned.name if pinned is not None else ""
        self.backend: Backend | None = None  # the backend being dialed, then connected
        self.tried: list[Backend] = []
        self.reason = ""  # why the pin moves, if it does
        self.wait_for: Backend | None = None  # a full pinned backend worth waiting for
        self.queued = False
        self.steered = False  # sent by a QUIC connection ID, whatever the pin (`steer`)


class Router:
    def __init__(
        self,
        spec: GroupSpec,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._wall = time.time
        self.backends = [Backend(b, i) for i, b in enumerate(spec.backends)]
        for b in self.backends:
            b.changed_at = self._wall()
        self.by_name = {b.name: b for b in self.backends}
        self.sorry = Backend(spec.sorry_server) if spec.sorry_server is not None else None
        self.scheduler: Scheduler = make_scheduler(spec.scheduler, self._primaries(), rng)
        self.backups = [b for b in self.backends if b.backup]
        p = spec.persistence
        self.keyer: Keyer = make_keyer(p.netmask, p.ipv6_prefix)
        self.table: AffinityTable[Backend] | None = (
            AffinityTable(p.timeout, p.max_entries, clock) if p.enabled else None
        )
        self.quorum = Quorum(spec.quorum, spec.hysteresis, self.up_count())
        self.proxy_trusted = _trusted(spec)
        self.admits = _admits(spec)
        # False once the runtime found this host unready for `source: client` (the way back
        # for the answers is missing): a dial that times out is then this host's failure.
        self.source_ready = True
        self.limits = ClientLimits(spec.client_limits, clock) if spec.client_limits else None
        self.clock = clock
        self.ramping: list[Backend] = []  # backends in their slow start
        # The connection log's writer when the group logs, set by the runtime; and whether a
        # line is written when a connection is established too.
        self.log: LogSink | None = None
        self.log_on_connect = False
        self.stats = GroupStats()
        self.listener: Callable[[Event], None] | None = None
        self._return = spec.on_up == "return"
        # Keys whose pin moved, for a shared table to hear of (None: nobody listens).
        self.repinned: list[int] | None = None
        # Told of every health verdict that changes a backend (workers: the one that checks
        # tells the others through the supervisor).
        self.health_hook: Callable[[Backend, bool, str], None] | None = None
        # Backends with an active health check of their own or the group's (`vouched`).
        self.checked = _checked(spec)
        self.quic: Codec | None = None  # QUIC-LB: the group's connection ID codec
        self.owners: dict[bytes, Backend] = {}  # QUIC-LB: server ID -> its backend
        self._quic_setup(spec)

    # ------------------------------------------------------------------ routing

    def begin(self, key: int, provisional: bool = False) -> Route:
        """`provisional`: a UDP flow not yet validated (see affinity.py)."""
        self.stats.accepted += 1
        table = self.table
        if table is None:
            return Route(key, entry=None, pinned=None)
        entry = table.acquire(key, provisional)
        if entry is None:
            self.stats.unpinned += 1
            return Route(key, entry=None, pinned=None)
        return Route(key, entry, entry.backend)

    def next_backend(self, route: Route) -> Backend | None:
        tried = route.tried
        route.wait_for = None
        sorry = self.sorry
        if sorry is not None and self.quorum.lost:
            choice = None if sorry in tried else sorry
        elif len(tried) >= len(self.backends):
            return None
        else:
            choice = self._choose(route)
            if choice is None:
                return None
        if choice is not None:
            tried.append(choice)
            choice.take_slot()
        route.backend = choice
        return choice

    def _choose(self, route: Route) -> Backend | None:
        entry = route.entry
        tried = route.tried
        pinned = entry.backend if entry is not None else None
        if pinned is not None and pinned not in tried:
            home = entry.home if entry is not None else None
            if self._return and home is not None and home.schedulable and home not in tried:
                route.reason = "returned"
                if entry is not None:
                    entry.backend = home
                    route.fresh = True  # a re-pin like any other: settled with a shared table
                return home
            if pinned.accepts_pinned:
                if not pinned.full:
                    return pinned
                if self.spec.queue_timeout > 0 and not route.queued:
                    route.wait_for = pinned
                    return None
                # Full for now: this connection goes elsewhere, the pin stays.
                route.reason = "full"
                return self.pick(route.key, tried)
            elif not route.reason:
                route.reason = "unavailable"
        elif pinned is not None and not route.reason:
            route.reason = "failed"
        if self.ramping:
            self.ramp()
        choice = self.pick(route.key, tried)
        if choice is not None and entry is not None:
            if pinned is not None and entry.home is None and not pinned.accepts_pinned:
                entry.home = pinned
            entry.backend = choice  # tentative pin, confirmed by `connected`
            route.fresh = True
        return choice

    def _primaries(self) -> list[Backend]:
        return [b for b in self.backends if not b.backup]

    def pick(self, key: int, exclude: Collection[Backend] = ()) -> Backend | None:
        """A new client's backend: the scheduler's among the backends that are not backups;
        when none of them can take it, the first backup that can, in the listed order (as
        HAProxy uses its first backup)."""
        choice = self.scheduler.pick(key, exclude)
        if choice is None:
            for b in self.backups:
                if b.schedulable and b not in exclude:
                    return b
        return choice

    def slow_start_of(self, backend: Backend) -> float:
        return backend.slow_start if backend.slow_start is not None else self.spec.slow_start

    def ramp(self) -> None:
        """Move the effective weights of ramping backends on (the new clients' pick reads them,
        so it calls this, only while a backend ramps; so does a scrape)."""
        now = self.clock()
        self.ramping = [b for b in self.ramping if b.ramp(now, self.slow_start_of(b))]

    def consistent(self, key: int) -> Backend | None:
        """The backend every instance picks for `key` without the shared table: the group's
        own scheduler when it is a consistent hash (sh, mh), else rendezvous hashing over the
        backends that take new clients."""
        if self.spec.scheduler in ("sh", "mh"):
            return self.pick(key)
        return rendezvous(key, [b for b in self.backends if b.schedulable and not b.backup]) or (
            self.pick(key)
        )

    def vouched(self, backend: Backend) -> bool:
        """Whether l4lb's own active check (from its own address) finds `backend` up: then a
        dial from another source that goes unanswered is that source's way back failing,
        not the backend (`source: client`)."""
        return backend.healthy and backend.name in self.checked

    def usable_pin(self, name: str) -> Backend | None:
        """The backend another instance pinned a client to, if this one may send it there."""
        b = self.by_name.get(name)
        return b if b is not None and b.accepts_pinned and not b.full else None

    def swap(self, route: Route, backend: Backend) -> None:
        """Dial `backend` instead of the candidate `next_backend` gave (the shared table or the
        consistent hash decided); the pin follows."""
        old = route.backend
        if old is backend:
            return
        if old is not None:
            old.free_slot()
            route.tried.remove(old)  # still worth a try if the new one fails
        backend.take_slot()
        route.tried.append(backend)
        route.backend = backend
        if route.entry is not None:
            route.entry.backend = backend

    def failed(self, route: Route, backend: Backend, reason: str = "refused") -> None:
        """A dial failed; `reason` is refused, timeout or error."""
        backend.free_slot()
        backend.connect_failures += 1
        backend.failures_in_row += 1
        stats = self.stats
        stats.connect_failures += 1
        if reason == "refused":
            stats.failed_refused += 1
            backend.failed_refused += 1
        elif reason == "timeout":
            stats.failed_timeout += 1
            backend.failed_timeout += 1
        route.backend = None
        n = self.spec.passive_failures
        if n and backend.failures_in_row >= n and backend.healthy and backend is not self.sorry:
            self.set_health(backend, False, f"{backend.failures_in_row} connect failures in a row")

    def source_failure(self, route: Route, backend: Backend) -> None:
        """A dial could not come from its `source` (a missing capability or route on this
        host): the connection is given up, and neither the backend nor the pin is blamed."""
        backend.free_slot()
        route.backend = None
        self.stats.source += 1

    def local_failure(self, route: Route, backend: Backend, name: str) -> None:
        """A dial this process could not even start (out of descriptors): the connection is
        given up, and neither the backend nor the pin is blamed."""
        backend.free_slot()
        route.backend = None
        self.stats.descriptors += 1

    def connected(self, route: Route, backend: Backend) -> str:
        """`route` reached `backend`: counted, and the client's entry pinned there. Returns
        what became of the pin, as the connection log names it: `sorry`, `none` (no
        persistence), `unpinned` (no entry: the table was full), `full` (the pinned backend
        was full: sent elsewhere, the pin kept), `new`, `hit`, or `repin` (why:
        `route.reason`, "" for a failure)."""
        backend.connections += 1
        backend.failures_in_row = 0
        if route.steered:
            entry = route.entry
            if entry is not None and entry.backend is backend and not entry.since:
                entry.since = self.clock()
            route.pinned = entry.backend if entry is not None else None
            return "cid"
        if backend is self.sorry:
            self.stats.sorry += 1
            return "sorry"
        entry = route.entry
        if entry is None:
            return "none" if self.table is None else "unpinned"
        if route.reason == "full":
            return "full"
        pinned = route.pinned
        if pinned is None or pinned is backend:
            if not entry.since:
                entry.since = self.clock()
            entry.backend = backend
            return "new" if pinned is None else "hit"
        entry.since = self.clock()
        entry.repin = (entry.since, route.reason or "failed", pinned.name)
        stats = self.stats
        if route.reason == "returned":
            stats.repins_returned += 1
            entry.home = None
        elif route.reason == "unavailable":
            stats.repins_unavailable += 1
        else:
            stats.repins_failed += 1
        route.pinned = backend
        if self.repinned is not None:
            self.repinned.append(entry.key)
        entry.backend = backend
        return "repin"

    def give_up(self, route: Route) -> None:
        """No backend accepted the connection: the pin stays as it was before this one."""
        self.stats.no_backend += 1
        entry = route.entry
        if entry is not None and entry.refs == 1:
            entry.backend = route.pinned
        self.finish(route)

    def end(
        self,
        route: Route,
        *,
        backend: Backend | None,
        nbytes_in: int,
        nbytes_out: int,
        duration: float | None,
        given_up: bool,
        rec: Record | None,
        now: float = 0.0,
        via: tuple[str, int] | None = None,
        port: int = 0,
        udp: bool = False,
    ) -> None:
        """The end of a connection or flow, whatever its protocol, in one place so that no
        protocol forgets a step: its bytes to `backend` (the one it reached, if any), its
        `duration` observed (None: not counted), its entry released (`given_up`: no backend
        took it, and the pin stays as it was), its client network's `client_limits` slot
        released, and, with a `rec`, its line handed to the log at loop time `now` (`via`:
        the client a PROXY header named; `port`, `udp`: its service, for a line that reached
        no backend)."""
        if backend is not None:
            backend.bytes_in += nbytes_in
            backend.bytes_out += nbytes_out
        if duration is not None:
            self.stats.duration.observe(duration)
        if given_up:
            self.give_up(route)
        else:
            self.finish(route)
        if self.limits is not None:
            self.limits.release(route.key)
        sink = self.log
        if rec is not None and sink is not None:
            if rec.routed is None:  # refused before any dial, or gone while it went on
                rec.routed = unrouted(self.name, port, len(route.tried), udp)
            sink.log(rec, now, via, nbytes_in, nbytes_out, True)

    def finish(self, route: Route) -> None:
        backend = route.backend
        if backend is not None:
            backend.free_slot()
            route.backend = None
        entry = route.entry
        if entry is not None and self.table is not None:
            route.entry = None
            if entry.backend is not None and not entry.backend.accepts_pinned and entry.refs == 1:
                entry.backend = None  # a pin to a dead backend is not worth remembering
            self.table.release(entry)

    def _renamed(
        self, bs: BackendSpec, wanted: set[str], previous: dict[str, BackendSpec]
    ) -> Backend | None:
        """A name that went from one address to several, or back (`NAME` and `NAME-ADDRESS`,
        l4lb/config/names.py): the backend at the same address, of the same name, keeps its pins."""
        for b in self.backends:
            if (
                b.hostname == bs.hostname
                and b.address == bs.address
                and b.name not in wanted
                and b.name in previous
                and not b.removed
            ):
                return b
        return None

    def all_backends(self) -> list[Backend]:
        return [*self.backends, self.sorry] if self.sorry is not None else list(self.backends)

    def reconfigure(
        self, spec: GroupSpec, clock: Callable[[], float], rng: random.Random | None
    ) -> list[str]:
        """Apply a reloaded group. Backends are matched by name, so pins to the ones that remain
        stay; removed ones are marked so that their pins move on. Returns what changed."""
        old = self.spec
        self.clock = clock
        previous = {b.name: b for b in old.backends}
        changes = config_changes(old, spec, skip=("name", "backends"))
        backends: list[Backend] = []
        wanted = {bs.name for bs in spec.backends}
        for i, bs in enumerate(spec.backends):
            b = self.by_name.get(bs.name)
            if b is None and bs.hostname:
                b = self._renamed(bs, wanted, previous)
                if b is not None:
                    changes.append(f"backend {b.name} is now {bs.name} ({bs.hostname})")
                    previous[bs.name] = previous.pop(b.name)
                    b.rename(bs.name)
            if b is None:
                b = Backend(bs, i)
                b.changed_at = self._wall()
                changes.append(f"backend {bs.name} added")
            else:
                was = previous[bs.name]
                if bs != was:
                    what = ", ".join(config_changes(was, bs, skip=("unresolved",)))
                    changes.append(f"backend {bs.name} changed: {what}")
                b.update(bs, was, i)
                if bs.unresolved and not was.unresolved:
                    self.set_health(b, False, bs.unresolved)
                elif was.unresolved and not bs.unresolved:  # (its checks, if any, then judge)
                    self.set_health(b, True, f"{bs.hostname} resolves to {bs.address}")
            backends.append(b)
        names = {b.name for b in backends}
        for b in self.backends:
            if b.name not in names:
                b.remove()
                changes.append(f"backend {b.name} removed")
        kept = [b.name for b in backends if b.name in previous]
        if kept != [b.name for b in self.backends if b.name in names]:
            changes.append("backends reordered")
        self.backends = backends
        self.by_name = {b.name: b for b in backends}
        if spec.sorry_server != old.sorry_server:
            self.sorry = Backend(spec.sorry_server) if spec.sorry_server is not None else None
        primaries = self._primaries()
        if spec.scheduler != old.scheduler or [b.name for b in primaries] != [
            b.name for b in old.backends if not b.backup
        ]:
            self.scheduler = make_scheduler(spec.scheduler, primaries, rng)
        else:
            self.scheduler.backends = primaries  # type: ignore[attr-defined]
            self.scheduler.rebuild()
        self.backups = [b for b in backends if b.backup]
        p = spec.persistence
        self.keyer = make_keyer(p.netmask, p.ipv6_prefix)
        if not p.enabled:
            self.table = None
        elif self.table is None:
            self.table = AffinityTable(p.timeout, p.max_entries, clock)
        else:
            self.table.timeout = p.timeout
            self.table.max_entries = p.max_entries
        self.quorum = Quorum(spec.quorum, spec.hysteresis, self.up_count())
        self.proxy_trusted = _trusted(spec)
        self.admits = _admits(spec)
        if spec.client_limits is None:
            self.limits = None
        elif self.limits is None:
            self.limits = ClientLimits(spec.client_limits, clock)
        elif spec.client_limits != old.client_limits:
            self.limits.reconfigure(spec.client_limits)
        self._return = spec.on_up == "return"
        self.spec = spec
        self.checked = _checked(spec)
        self._quic_setup(spec)
        return changes

    # ------------------------------------------------------------------ QUIC-LB

    def _quic_setup(self, spec: GroupSpec) -> None:
        q = spec.quic_lb
        if q is None:
            self.quic = None
            self.owners = {}
            return
        self.quic = Codec(q.config_id, q.server_id_length, q.nonce_length, q.key)
        owners: dict[bytes, Backend] = {}
        for b in self.backends:  # (a name resolved to many addresses: its first owns the ID)
            if b.server_id:
                owners.setdefault(bytes.fromhex(b.server_id), b)
        self.owners = owners

    def quic_route(self, datagram: bytes, key: int) -> tuple[str, Backend | None, bytes]:
        """How a QUIC datagram that opens a flow (a client address and port new to l4lb) is
        routed, after the draft's section 3.1, and the destination connection ID it was read
        from (b"" when none was): `cid` to the backend whose server ID its destination
        connection ID carries (returned), when that backend takes pinned clients and has a free
        slot; `full` (dropped) when that backend is at its `max_conns`: the connection lives
        on that server and no other can answer it, so the datagram waits for the client's
        retransmission rather than meet another server's stateless reset; `pin` by today's
        rule when the client chose the ID (a v1 Initial or 0-RTT); `fallback` by today's rule
        for a long header whose ID is unroutable (another config, the 0b111 codepoint, an
        unknown or unavailable server), and for a short header whose client network is pinned
        to a backend that takes it; `unroutable` (dropped) for any other short header: no
        server asked for it (a random ID from a fresh network), one too short for its ID
        included (the draft counts it unroutable); and `malformed` (dropped) for a long header
        too short to say its connection ID."""
        codec = self.quic
        assert codec is not None
        got = destination_cid(datagram, 1 + codec.length)
        dcid = b""
        if got is not None:
            dcid, kind = got
            if kind == CHOSEN:
                return "pin", None, dcid
            sid = codec.server_id(dcid)
            owner = self.owners.get(sid) if sid is not None else None
            if owner is not None and owner.accepts_pinned and not owner.removed:
                return ("full" if owner.full else "cid"), owner, dcid
            if kind != SHORT:
                return ("pin" if kind == OTHER else "fallback"), None, dcid
        elif not datagram or datagram[0] & 0x80:  # a long header cut short, or nothing
            return "malformed", None, dcid
        table = self.table
        entry = table.get(key) if table is not None else None
        pinned = entry.backend if entry is not None else None
        if pinned is not None and pinned.accepts_pinned:
            return "fallback", None, dcid
        return "unroutable", None, dcid

    def takes_new(self, backend: Backend) -> bool:
        """Whether `backend` may be given a client it has never had: schedulable (up, enabled,
        weight above 0, a free slot), and for a backup, only while no primary is."""
        if not backend.schedulable or backend.removed:
            return False
        return not backend.backup or not any(b.schedulable for b in self.backends if not b.backup)

    def steer(self, route: Route, backend: Backend) -> None:
        """A QUIC connection ID names `backend`: this flow goes there whatever the pin says. The
        client network's entry is pinned there only if it had no pin (a migrated client's new
        network: its TCP follows) and the backend takes new clients (not draining, not a
        backup while a primary can take them: a forged ID must not give a network a pin the
        scheduler would never have made); a network pinned elsewhere keeps its pin."""
        route.steered = True
        entry = route.entry
        if entry is not None and entry.backend is None and self.takes_new(backend):
            entry.backend = backend
        route.tried.append(backend)
        backend.take_slot()
        route.backend = backend

    # ------------------------------------------------------------------ state changes

    def up_count(self) -> int:
        """Backends that can take new clients, fullness aside (what the quorum counts)."""
        return sum(
            1
            for b in self.backends
            if b.healthy and b.admin is State.UP and b.weight > 0 and not b.removed
        )

    def _begin_ramp(self, backend: Backend) -> None:
        """A backend came (back) up: it takes new clients at 10% of its weight, ramping to all
        of it over its slow_start, so that wlc does not send it every new client at once."""
        backend.ramp_since = self.clock()
        backend.ramp(backend.ramp_since, self.slow_start_of(backend))
        if backend not in self.ramping:
            self.ramping.append(backend)

    def set_health(self, backend: Backend, healthy: bool, reason: str) -> None:
        if backend.healthy == healthy:
            return
        self._change(backend, lambda: backend.set_healthy(healthy), reason)
        if self.health_hook is not None:
            self.health_hook(backend, healthy, reason)

    def set_admin(self, backend: Backend, state: State, reason: str = "operator") -> None:
        self._change(backend, lambda: backend.set_admin(state), reason)

    def set_weight(self, backend: Backend, weight: int, reason: str = "operator") -> None:
        def apply() -> None:
            backend.set_weight(weight)
            self.scheduler.rebuild()

        was = backend.weight
        self._change(backend, apply, reason)
        if weight != was:  # an event too, for the log and the status page
            self._emit(backend.name, f"weight {was}", f"weight {weight}", reason)

    def _change(self, backend: Backend, apply: Callable[[], None], reason: str) -> None:
        old = backend.state
        apply()
        if backend.state is not old:
            backend.note_state(self._wall())
            self._emit(backend.name, old.value, backend.state.value, reason)
            if backend.state is State.UP and self.slow_start_of(backend) > 0:
                self._begin_ramp(backend)
        lost = self.quorum.update(self.up_count())
        if lost is not None and self.sorry is not None:
            up = self.up_count()
            if lost:
                self._emit(
                    None, "standby", "serving", f"{up} backends up, quorum {self.spec.quorum}"
                )
            else:
                self._emit(
                    None, "serving", "standby", f"{up} backends up, quorum {self.spec.quorum}"
                )

    def _emit(self, backend: str | None, old: str, new: str, reason: str) -> None:
        if self.listener is not None:
            self.listener(Event(self._wall(), self.name, backend, old, new, reason))
