"""The routing decision for one group: affinity first, then the scheduler, then failover.

Theory of operation
-------------------
A connection's life, as the router sees it (`dataplane/path.py` makes these calls for TCP and
UDP alike):

1. `begin(key)` takes a reference on the key's affinity entry (or none, when persistence is off
   or the table is full of busy entries) and remembers the backend it was pinned to.
2. `next_backend(route)` gives the backend to dial:
   - while the group has lost its quorum and has a sorry server: the sorry server, never pinned;
   - the pinned backend, if it still accepts pinned clients (up, draining, or inhibited) and
     has a free slot. If it is full and the group has a `queue_timeout` (and the caller may
     wait: a datagram does not), it returns None with `route.wait_for` set: the caller waits
     for a slot, says so (`waited`), then asks again. A connection that finds its backend
     still full goes to the scheduler's pick, but the pin stays;
   - with `on_up: return`, a client moved away from a failed backend goes back to it once it is
     up again;
   - otherwise the scheduler's pick among the backends not yet tried. A new entry is pinned to
     it right away, so a second connection of the same client arriving mid-dial follows it.
   After as many attempts as there are backends, it gives None: the client is closed.
3. `connected(route, backend)` confirms the pin. If the entry pointed elsewhere before this
   connection, that is a re-pin, counted by its reason; `held` readies the route for a later
   move (a UDP flow whose backend fails).
4. `failed(route, backend)` records a refused or timed-out dial; `passive_failures` of them in
   a row mark the backend down at once (the passive check). `given_up` is a dial this host
   could not make (its `source`, a descriptor): counted, nobody blamed.
5. `end(conn)` accounts for the connection (`accounting.tally`), releases the entry (starting
   its timeout when it was the last connection) and the backend's slot, and logs its line.

With a shared affinity store, a new pin (step 2 with no usable pin) is marked `route.fresh`;
the store settles it before the dial (`settling`, `shared_as`), and may `swap` the dial to the
pin another instance made, or to `consistent(key)`, the hash every instance computes alike,
when the store cannot answer in time.

A pinned backend that is unavailable is never waited on: the connection is rescheduled at
once and the entry re-pinned to whichever backend accepts it. A `Route` is written only here
and in the router's other modules (`quicroute.py`); the backends' states, their events and
slow start are `states.GroupState`'s, the base of `Router`. Pure logic, no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .accounting import GroupStats, tally
from .affinity import AffinityTable
from .backends import Backend
from .connection import ENDED, Conn, LogSink, unrouted
from .keys import Keyer, make_keyer, make_matcher
from .limits import ClientLimits
from .quicroute import QuicRouting
from .route import Route
from .spec import GroupSpec
from .states import GroupState


def trusted_test(spec: GroupSpec) -> Callable[[str], bool] | None:
    """Which peers may send a PROXY header, when the group takes them."""
    return make_matcher(list(spec.accept_proxy.trusted)) if spec.accept_proxy is not None else None


def access_test(spec: GroupSpec) -> Callable[[str], bool] | None:
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


class Router(GroupState):
    """One group's routing decision and pins; its backends' states come from `GroupState`."""

    def __init__(
        self, spec: GroupSpec, clock: Callable[[], float], rng: random.Random | None = None
    ) -> None:
        super().__init__(spec, clock, rng)
        p = spec.persistence
        self.keyer: Keyer = make_keyer(p.netmask, p.ipv6_prefix)
        self.table: AffinityTable[Backend] | None = (
            AffinityTable(p.timeout, p.max_entries, clock) if p.enabled else None
        )
        self.proxy_trusted = trusted_test(spec)
        self.admits = access_test(spec)
        # False once the runtime found this host unready for `source: client` (the way back
        # for the answers is missing): a dial that times out is then this host's failure.
        self.source_ready = True
        self.limits = ClientLimits(spec.client_limits, clock) if spec.client_limits else None
        # The connection log's writer when the group logs, set by the runtime; and whether a
        # line is written when a connection is established too.
        self.log: LogSink | None = None
        self.log_on_connect = False
        self.stats = GroupStats()
        self.returns = spec.on_up == "return"
        # Keys whose pin moved, for a shared table to hear of (None: nobody listens).
        self.repinned: list[int] | None = None
        q = spec.quic_lb
        self.quic = QuicRouting(q, self.backends) if q is not None else None

    # ------------------------------------------------------------------ the decision

    def begin(self, key: int, *, provisional: bool = False) -> Route:
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

    def next_backend(self, route: Route, *, wait: bool = True) -> Backend | None:
        """The backend to try next (`wait` False: a full pinned backend is not waited for)."""
        tried = route.tried
        route.wait_for = None
        sorry = self.sorry
        if sorry is not None and self.quorum.lost:
            choice = None if sorry in tried else sorry
        elif len(tried) >= len(self.backends):
            return None
        else:
            choice = self._choose(route, wait)
            if choice is None:
                return None
        if choice is not None:
            tried.append(choice)
            choice.take_slot()
        route.backend = choice
        return choice

    def _choose(self, route: Route, wait: bool) -> Backend | None:
        entry = route.entry
        tried = route.tried
        pinned = entry.backend if entry is not None else None
        if pinned is not None and pinned not in tried:
            home = entry.home if entry is not None else None
            if self.returns and home is not None and home.schedulable and home not in tried:
                route.reason = "returned"
                if entry is not None:
                    entry.backend = home
                    route.fresh = True  # a re-pin like any other: settled with a shared table
                return home
            if pinned.accepts_pinned:
                if not pinned.full:
                    return pinned
                if wait and self.spec.queue_timeout > 0 and not route.queued:
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

    @staticmethod
    def waited(route: Route) -> None:
        """`route` waited for its full pinned backend once: it does not wait again."""
        route.queued = True

    def adopt(self, key: int, backend: Backend | None, *, provisional: bool = False) -> Route:
        """A connection or flow the previous process handed over (an upgrade, counted there):
        its entry referenced and pinned to `backend` if it had no pin, its slot taken."""
        table = self.table
        entry = table.acquire(key, provisional) if table is not None else None
        if entry is not None and entry.backend is None:
            entry.backend = backend
        route = Route(key, entry, backend)
        if backend is not None:
            backend.take_slot()
            route.backend = backend
            route.tried.append(backend)
        return route

    # ------------------------------------------------------------------ the shared table

    @staticmethod
    def settling(route: Route) -> None:  # the shared table is asked about its fresh pin, once
        route.fresh = False

    @staticmethod
    def shared_as(route: Route, name: str) -> None:  # the shared table holds `name` for it now
        route.shared = name

    def swap(self, route: Route, backend: Backend, *, follows: bool = False) -> None:
        """Dial `backend` instead of the candidate `next_backend` gave (the shared table or the
        consistent hash decided); the pin follows (`follows`: another connection of the
        client settled it there, and this one takes it as its own)."""
        old = route.backend
        if follows:
            route.pinned = backend
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

    # ------------------------------------------------------------------ outcomes

    def failed(self, route: Route, backend: Backend, reason: str = "refused") -> None:
        """A dial failed (or a flow's backend answered with an ICMP error); `reason` is
        refused, timeout or error. A QUIC-steered route falls back to today's rule."""
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
        route.steered = False
        n = self.spec.passive_failures
        if n and backend.failures_in_row >= n and backend.healthy and backend is not self.sorry:
            self.set_health(backend, False, f"{backend.failures_in_row} connect failures in a row")

    def given_up(self, route: Route, backend: Backend, *, source: bool) -> None:
        """A dial this host could not make: from its `source` (a missing capability or route),
        or at all (out of descriptors). Counted by that reason; neither the backend nor the
        pin is blamed."""
        backend.free_slot()
        route.backend = None
        if source:
            self.stats.source += 1
        else:
            self.stats.descriptors += 1

    @staticmethod
    def leave(route: Route) -> None:
        """A flow's backend went down, was disabled or removed: the flow moves on (not a
        failure of the backend), by today's rule even where a QUIC ID had sent it."""
        backend = route.backend
        if backend is not None:
            backend.free_slot()
            route.backend = None
        route.reason = "unavailable"
        route.steered = False

    def connected(self, route: Route, backend: Backend) -> str:
        """`route` reached `backend`: counted, the entry pinned there. What became of the pin,
        as the log says it: cid (a QUIC ID sent it), sorry, none (no persistence), unpinned (the
        table was full), full (the pin's backend was: sent elsewhere, the pin kept), new, hit,
        or repin (why: `route.reason`, "" for a failure)."""
        backend.connections += 1
        backend.failures_in_row = 0
        entry = route.entry
        if route.steered:
            if entry is not None and entry.backend is backend and not entry.since:
                entry.since = self.clock()
            route.pinned = entry.backend if entry is not None else None
            return "cid"
        if backend is self.sorry:
            self.stats.sorry += 1
            return "sorry"
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

    @staticmethod
    def held(route: Route, backend: Backend) -> None:
        """From here on the connection or flow holds this pin: a later move (a flow's backend
        failing) is a re-pin away from it. A steered flow leaves its network's pin as it was."""
        if not route.steered:
            route.pinned = backend
        route.reason = ""
        route.fresh = False

    # ------------------------------------------------------------------ ends

    def end(self, conn: Conn, *, now: float, given_up: bool = False) -> None:
        """The end of a connection or flow, whatever its protocol, in one place so that no
        protocol forgets a step: its counters (`accounting.tally`), its entry released
        (`given_up`: no backend took it, and the pin stays as it was), its client network's
        `client_limits` slot released, and its line handed to the log at loop time `now`."""
        route = conn.route
        if route is None:
            return
        conn.route = None
        conn.phase = ENDED
        tally(self.stats, conn, now, given_up=given_up)
        if given_up:
            self.give_up(route)
        else:
            self.finish(route)
        if self.limits is not None:
            self.limits.release(route.key)
        sink = self.log
        if sink is not None:
            if conn.routed is None:  # refused before any dial, or gone while it went on
                conn.routed = unrouted(self.name, conn.port, len(route.tried), udp=conn.udp)
            sink.log(conn, now, end=True)

    def give_up(self, route: Route) -> None:
        """No backend took it: the pin stays as it was."""
        entry = route.entry
        if entry is not None and entry.refs == 1:
            entry.backend = route.pinned
        self.finish(route)

    def finish(self, route: Route) -> None:
        """Release `route`'s slot and entry (its timeout starts if it was the last)."""
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
