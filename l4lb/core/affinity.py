"""The affinity table: which backend each masked client address is pinned to.

Theory of operation
-------------------
This is the userspace form of an LVS persistence template. One table serves one mark group,
so a client pinned through any port of the group is pinned for all of them.

An entry is *active* while at least one connection under it is open or being dialed, and
*idle* otherwise. An active entry never expires and is never evicted: a client with an open
connection keeps its pin however long the connection lasts (IPVS does the same with
`n_control`, but re-arms 60 s steps; we simply hold the entry). An idle entry expires `timeout`
after its last connection closed, so an entry expires `timeout` after the later of the last
connection opened under it and the last one closed.

Storage. A table may hold a million clients, so an idle entry is not an object: `_entries` maps
each key to either an `Entry` (active, or idle with a re-pin's history) or, for the common idle
entry, one int packing its expiry (ms), flags, the backend's index in `_backends`, when it was
pinned (0.1 s) and its *ticket* (below). Acquiring an idle entry unpacks it into an `Entry`.
A released entry stays an object for `YOUNG` (a second or two: the sweep packs it, from
`_young`, in release order), so that a client that comes back within seconds, the common case,
costs no packing and unpacking at all. About 120 bytes per idle entry instead of about 490.

Order. Idle entries expire in the order they were released (the timeout is the table's), and
the oldest idle entry is the one a full table evicts. That order is kept in two FIFO queues of
keys, `_order` (confirmed entries) and `_prov` (provisional ones, below), rather than in an
OrderedDict (over 150 bytes an entry). A key's *place* is its position in its queue; the
entry's ticket is the absolute number of that place (mod 2**29), so a place whose entry was
deleted, re-created or moved to the other queue is recognised as a ghost and skipped when it
reaches the front. A release does not add a second place for a key that already has one (that
would grow the queue with every connection of a busy client): it marks the entry *moved*, and
when a moved entry's place reaches the front unexpired it is put at the back. So the queues
hold about one place per entry, and the front of `_order` is the oldest idle entry, give or take
a moved entry's requeue. A hit checks its own entry's expiry, so the sweep from the front need
not run on every lookup: it runs at most once per `SWEEP_INTERVAL` of the clock and visits at
most `SWEEP_SLICE` places at a time (a million entries that expire together are swept a slice
per call, never in one long pause of the loop).

The table is bounded by `max_entries`. A new client when the table is full evicts the oldest
idle entry; when every entry is active the connection goes unpinned (`acquire` returns None) and
`overflows` counts it.

Entries a UDP flow made are *provisional* until the flow is validated (its client sent again
after the backend answered): a datagram's source costs nothing to forge, so such an entry must
not cost a real client its pin. A provisional entry never evicts a confirmed one: when the table
is full it may only take the place of an idle provisional entry (the front of `_prov`), else its
flow goes unpinned; a confirmed new entry evicts idle provisional entries first. Idle
provisional entries are also bounded on their own (`max_entries // 4`). A TCP connection or a
validated flow under an entry confirms it (`confirm`).

The table does not judge backends: the router decides whether the pinned backend may still be
used, and re-pins by assigning `entry.backend` (an active entry) or `repin` (any). Walks over
the whole table (the state save, the API, a shared store) take `keys()` (one C-speed copy) and
look at it in slices with `view`, yielding between slices; nothing here walks for them. The clock
is injected, so tests use a fake one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar, cast

B = TypeVar("B")

# The packed idle entry: bit fields of one int (4 digits of CPython's 30-bit ints: 40 bytes).
_EXP_BITS = 42  # expiry in ms of the clock: 139 years
_EXP = (1 << _EXP_BITS) - 1
_PROV = 1 << 42  # provisional
_MOVED = 1 << 43  # released again since it got its place
_IN_PROV = 1 << 44  # its place is in `_prov` (else in `_order`)
_TICKET_SHIFT = 45
_TICKET = (1 << 29) - 1  # (a ghost would need to lie 2**29 places behind to pass for its entry)
_BACKEND_SHIFT = 74
_BACKEND = (1 << 12) - 1  # a table remembers 4,096 backends; beyond, entries stay objects
_SINCE_SHIFT = 86
_SINCE_END = 1 << 34  # tenths of a second of the clock: 54 years


class Entry(Generic[B]):
    __slots__ = (
        "backend",
        "expires",
        "home",
        "in_prov",
        "key",
        "moved",
        "provisional",
        "ref",
        "refs",
        "repin",
        "since",
        "ticket",
    )

    def __init__(self, key: int, ref: object) -> None:
        self.key = key
        self.ref = ref  # the key as the table's dict and queues hold it (see "Storage")
        self.backend: B | None = None
        self.home: B | None = None  # where the client was before its backend failed
        self.refs = 0
        self.since = 0.0  # the clock when the current pin was made (0: not yet)
        self.repin: tuple[float, str, str] | None = None  # the last: (clock, reason, from)
        # Idle: when it expires. Active: when it became active (a shared store renews what
        # became active since its last round; `_active`'s order is the activation order).
        self.expires = 0.0
        self.provisional = False  # made by an unvalidated UDP flow (see above)
        self.ticket = -1  # its place in a queue (-1: none), `in_prov` says which queue
        self.in_prov = False
        self.moved = False


class AffinityTable(Generic[B]):
    SWEEP_INTERVAL = 1.0  # seconds between sweeps of expired idle entries
    SWEEP_SLICE = 1024  # places one sweep visits at most (about 1 ms)
    YOUNG = 1.0  # seconds a released entry stays an object before it is packed

    def __init__(self, timeout: float, max_entries: int, clock: Callable[[], float]) -> None:
        if timeout <= 0:
            raise ValueError("an affinity table needs a positive timeout")
        self.timeout = timeout
        self.max_entries = max_entries
        self.clock = clock
        # Keys are typed `object` in the containers so that, compiled, they share one boxed int
        # (mypyc holds an `int` unboxed and would box a new one for each container).
        self._entries: dict[object, Entry[B] | int] = {}
        self._active: dict[object, Entry[B]] = {}  # in the order they became active
        self._order: deque[object] = deque()  # places of confirmed idle entries
        self._prov: deque[object] = deque()  # places of provisional idle entries
        self._placed = [0, 0]  # places ever made in _order, in _prov (the next ticket)
        self._nprov = 0  # idle provisional entries
        self._young: deque[tuple[Entry[B], float]] = deque()  # released, not packed yet
        self._backends: list[B] = []
        self._backend_index: dict[int, int] = {}  # id(backend) -> index; the list keeps it alive
        self._sweep_at = 0.0
        # Keys whose last connection closed, for a shared store to renew (None: nobody asks).
        self.released: list[int] | None = None
        self.touched: set[object] | None = None  # released since `mark` (an upgrade's)
        # Asked on a miss while saved pins are still being restored: it restores `key`'s pin
        # now if it has one (so that a client is never scheduled afresh by mistake).
        self.fault_in: Callable[[int], object] | None = None
        # Plain counters, read by whoever reports them.
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def idle_count(self) -> int:
        return len(self._entries) - len(self._active)

    # ------------------------------------------------------------------ packing

    def _pack(self, e: Entry[B]) -> Entry[B] | int:
        """An idle entry as it is stored: an int, unless it carries a re-pin's history or a
        field does not fit (then the object itself)."""
        backend = e.backend
        if backend is None or e.home is not None or e.repin is not None:
            return e
        index = self._backend_index.get(id(backend))
        if index is None:
            index = len(self._backends)
            if index > _BACKEND:
                return e
            self._backends.append(backend)
            self._backend_index[id(backend)] = index
        expires = int(e.expires * 1000) + 1  # (rounded up: never early)
        since = round(e.since * 10) or (1 if e.since > 0 else 0)
        if not (0 <= expires <= _EXP and 0 <= since < _SINCE_END):
            return e
        return (
            expires
            | (_PROV if e.provisional else 0)
            | (_MOVED if e.moved else 0)
            | (_IN_PROV if e.in_prov else 0)
            | e.ticket << _TICKET_SHIFT
            | index << _BACKEND_SHIFT
            | since << _SINCE_SHIFT
        )

    def _unpack(self, ref: object, v: int) -> Entry[B]:
        e: Entry[B] = Entry(cast(int, ref), ref)
        e.backend = self._backends[v >> _BACKEND_SHIFT & _BACKEND]
        e.expires = (v & _EXP) / 1000
        e.provisional = bool(v & _PROV)
        e.moved = bool(v & _MOVED)
        e.in_prov = bool(v & _IN_PROV)
        e.ticket = v >> _TICKET_SHIFT & _TICKET
        e.since = (v >> _SINCE_SHIFT) / 10
        return e

    @staticmethod
    def _expires(v: Entry[B] | int) -> float:
        return (v & _EXP) / 1000 if isinstance(v, int) else v.expires

    # ------------------------------------------------------------------ the connection's path

    def acquire(self, key: int, provisional: bool = False) -> Entry[B] | None:
        """Take a reference on `key`'s entry for a new connection, creating it if needed.

        A new entry has `backend` None: the caller pins it. None is returned only when the table
        is full of entries this one may not evict (active ones; confirmed ones, for a
        `provisional` one). A confirmed acquire confirms a provisional entry.
        """
        entries = self._entries
        v = entries.get(key)
        if v is None and self.fault_in is not None:
            self.fault_in(key)
            v = entries.get(key)
        if v is not None:
            if not isinstance(v, int) and v.refs:
                entry: Entry[B] = v
                entry.refs += 1
                self.hits += 1
                if not provisional:
                    entry.provisional = False
                return entry
            now = self.clock()
            if now >= self._sweep_at:
                self._expire(now)
                v = entries.get(key)
        if v is not None:
            entry = self._unpack(key, v) if isinstance(v, int) else v
            if entry.provisional:
                self._nprov -= 1
                entry.provisional = provisional
            if entry.expires > now:
                entry.refs = 1
                entry.expires = now
                entries[key] = entry
                self._active[key] = entry
                self.hits += 1
                return entry
            del entries[key]  # (its place is a ghost now)
            self.expirations += 1
        self.misses += 1
        if len(entries) >= self.max_entries and not self._evict(provisional):
            self.overflows += 1
            return None
        ref: object = key  # (boxed once: the dict, the queue and _active share it)
        entry = Entry(key, ref)
        entry.refs = 1
        entry.provisional = provisional
        entry.expires = self.clock()
        entries[ref] = entry
        self._active[ref] = entry
        return entry

    def confirm(self, entry: Entry[B]) -> None:
        """A provisional entry's client proved its address (it sent again after an answer)."""
        entry.provisional = False  # (an active entry: its flow holds a reference)

    def release(self, entry: Entry[B]) -> None:
        """Drop a connection's reference; the last one starts the entry's timeout."""
        entry.refs -= 1
        if entry.refs > 0:
            return
        key = entry.ref
        del self._active[key]
        if entry.backend is None:  # never pinned (every dial failed): nothing to remember
            del self._entries[key]
            return
        entry.expires = self.clock() + self.timeout
        prov = entry.provisional
        if entry.ticket >= 0 and entry.in_prov == prov:
            entry.moved = True  # keeps its place (see "Order" above)
        else:
            self._place(entry, prov)
        self._young.append((entry, entry.expires))  # (packed a second or so later)
        if self.released is not None:
            self.released.append(entry.key)
        if self.touched is not None:  # (an upgrade walks the table, and wants what moved since)
            self.touched.add(entry.ref)
        if prov:
            self._nprov += 1
            if self._nprov > max(1, self.max_entries // 4):  # a pool of its own, bounded
                self._evict_front(self._prov, True)

    def _place(self, entry: Entry[B], prov: bool) -> None:
        queue = self._prov if prov else self._order
        n = self._placed[prov]
        self._placed[prov] = n + 1
        queue.append(entry.ref)
        entry.ticket = n & _TICKET
        entry.in_prov = prov
        entry.moved = False

    # ------------------------------------------------------------------ the queues

    def _front(self, prov: bool) -> tuple[object, Entry[B] | int | None, bool]:
        """The front place of a queue: (key, its entry, whether the place is the entry's own).
        The queue must not be empty."""
        queue = self._prov if prov else self._order
        key = queue[0]
        ticket = (self._placed[prov] - len(queue)) & _TICKET
        v = self._entries.get(key)
        if v is None:
            return key, None, False
        if isinstance(v, int):
            mine = v >> _TICKET_SHIFT & _TICKET == ticket and bool(v & _IN_PROV) == prov
        else:
            e: Entry[B] = v
            mine = e.ticket == ticket and e.in_prov == prov
            if mine and e.refs:  # active: it will take a new place when released
                e.ticket = -1
                mine = False
        return key, v, mine

    def _remove_idle(self, key: object, v: Entry[B] | int) -> None:
        del self._entries[key]
        if (v & _PROV) if isinstance(v, int) else v.provisional:
            self._nprov -= 1

    def _evict_front(self, queue: deque[object], prov: bool) -> bool:
        """Evict the idle entry at the front of a queue, skipping ghosts and putting moved
        entries (released again since they got their place) at the back, a slice of them at
        most (then the front goes, moved or not); False: none."""
        budget = self.SWEEP_SLICE
        while queue:
            key, v, mine = self._front(prov)
            queue.popleft()
            if mine and v is not None:
                budget -= 1
                if budget > 0 and self._requeue(key, v, prov):
                    continue
                self._remove_idle(key, v)
                self.evictions += 1
                return True
        return False

    def _requeue(self, key: object, v: Entry[B] | int, prov: bool) -> bool:
        """A moved entry whose place left the front gets a place at the back; False: it was
        not moved (its place was the right one)."""
        if not ((v & _MOVED) if isinstance(v, int) else v.moved):
            return False
        e: Entry[B] = self._unpack(key, v) if isinstance(v, int) else v
        self._place(e, prov)
        self._entries[key] = self._pack(e)
        return True

    def _evict(self, provisional: bool) -> bool:
        """Make room for a new entry: the oldest idle provisional entry, else (for a confirmed
        one only) the oldest idle entry. False: nothing it may evict."""
        if self._nprov and self._evict_front(self._prov, True):
            return True
        return not provisional and self._evict_front(self._order, False)

    def expire(self) -> int:
        """Drop idle entries whose time is up, a slice at a time; returns how many went."""
        return self._expire(self.clock())

    def _expire(self, now: float) -> int:
        self._sweep_at = now + self.SWEEP_INTERVAL
        budget = self.SWEEP_SLICE
        n = 0
        for prov in (False, True):
            queue = self._prov if prov else self._order
            while queue and budget > 0:
                budget -= 1
                key, v, mine = self._front(prov)
                if not mine or v is None:
                    queue.popleft()  # a ghost
                    continue
                if self._expires(v) <= now:
                    queue.popleft()
                    self._remove_idle(key, v)
                    n += 1
                    continue
                if not self._requeue(key, v, prov):
                    break  # the front is the oldest: the rest are younger
                queue.popleft()
        budget = self._compact(now, budget)
        if budget <= 0:
            self._sweep_at = now + self.SWEEP_INTERVAL / 20  # more to do: soon, a slice again
        self.expirations += n
        return n

    def _compact(self, now: float, budget: int) -> int:
        """Pack the entries released more than YOUNG ago and idle since (see "Storage")."""
        young = self._young
        entries = self._entries
        cutoff = now - self.YOUNG + self.timeout
        while young and budget > 0:
            entry, expires = young[0]
            if expires > cutoff:
                break
            young.popleft()
            budget -= 1
            if not entry.refs and entry.expires == expires and entries.get(entry.ref) is entry:
                entries[entry.ref] = self._pack(entry)
        return budget

    # ------------------------------------------------------------------ looking and walking

    def get(self, key: int) -> Entry[B] | None:
        """Look without taking a reference (for inspection, not for routing). An idle entry
        comes as a copy: change it with `repin` or `forget`."""
        return self.view(key, self.clock())

    def view(self, key: int, now: float) -> Entry[B] | None:
        v = self._entries.get(key)
        if v is None:
            return None
        if isinstance(v, int):
            return self._unpack(key, v) if (v & _EXP) > now * 1000 else None
        e: Entry[B] = v
        return e if e.refs or e.expires > now else None

    def keys(self) -> list[int]:
        """Every key, as a list (one C-speed copy): walk it in slices with `view`."""
        return cast("list[int]", list(self._entries))

    def views(self, keys: Iterable[int]) -> list[Entry[B]]:
        """The live entries of `keys` (a slice of `keys()`)."""
        now = self.clock()
        out = []
        for key in keys:
            e = self.view(key, now)
            if e is not None:
                out.append(e)
        return out

    def entries(self) -> Iterator[Entry[B]]:
        """Every live entry, in one go: for small tables and tests; large walks use `keys`."""
        return iter(self.views(self.keys()))

    def active(self) -> Iterator[Entry[B]]:
        """Entries with open connections."""
        return iter(list(self._active.values()))

    def activated_since(self, when: float) -> Iterator[Entry[B]]:
        """Active entries that became active at `when` or later, newest first."""
        out = []
        for entry in reversed(self._active.values()):
            if entry.expires < when:
                break
            out.append(entry)
        return iter(out)

    def take_released(self) -> list[int]:
        """The keys released since the last call (`released` must be a list)."""
        out, self.released = self.released or [], []
        return out

    def repin(self, key: int, backend: B) -> bool:
        """Point `key`'s entry, active or idle, at `backend`; False: no such entry."""
        v = self._entries.get(key)
        if v is None:
            return False
        if isinstance(v, int):
            e = self._unpack(key, v)
            e.backend = backend
            self._entries[key] = self._pack(e)
        else:
            v.backend = backend
        return True

    def snapshot(self) -> list[tuple[int, B, float]]:
        """(key, backend, seconds left) of every pinned entry; an active entry counts as just
        released, with the whole timeout left. In one go: large tables use `export`."""
        return self.export(self.keys())

    def export(self, keys: Iterable[int]) -> list[tuple[int, B, float]]:
        """`snapshot` of a slice of `keys()`."""
        now = self.clock()
        out: list[tuple[int, B, float]] = []
        for e in self.views(keys):
            if e.backend is not None:
                out.append((e.key, e.backend, self.timeout if e.refs else e.expires - now))
        return out

    def ordered(self) -> list[tuple[list[int], int, bool]]:
        """Copies of the keys to save, in the order a restore should load them: the active
        ones, then each queue (oldest first) with the ticket of its first place and whether it
        is the provisional one. Walk them in slices with `export_places`."""
        return [
            (cast("list[int]", list(self._active)), -1, False),
            (cast("list[int]", list(self._order)), self._placed[False] - len(self._order), False),
            (cast("list[int]", list(self._prov)), self._placed[True] - len(self._prov), True),
        ]

    def mark(self) -> None:
        """From now on, remember every entry released (a connection's end, a re-pin):
        `ordered_since` lists them with the active ones; `unmark` forgets."""
        self.touched = set()

    def unmark(self) -> None:
        self.touched = None

    def ordered_since(self) -> list[tuple[list[int], int, bool]]:
        """As `ordered`, but of what changed since `mark`: the active keys, and the entries
        released since (each as it is now, whatever its place): what an upgrade sends once
        frozen, after the walk it made while serving."""
        active = cast("list[int]", list(self._active))
        touched = cast("list[int]", [k for k in self.touched or () if k not in self._active])
        return [(active, -1, False), (touched, -2, False)]

    def export_places(
        self, keys: list[int], first: int, prov: bool
    ) -> list[tuple[int, B, float, bool]]:
        """(key, backend, seconds left, provisional) of the pinned entries of a slice of one of
        `ordered()`'s lists (`first`: its first place's ticket, -1 for the active keys); a
        place that is no longer its entry's is skipped, so each entry comes once."""
        now = self.clock()
        out: list[tuple[int, B, float, bool]] = []
        entries = self._entries
        for j, key in enumerate(keys):
            v = entries.get(key)
            if v is None:
                continue
            if first == -1:
                if not isinstance(v, int) and v.refs and v.backend is not None:
                    out.append((key, v.backend, self.timeout, v.provisional))
                continue
            if first == -2:  # (`ordered_since`'s: an idle entry whatever its place)
                e = self._unpack(key, v) if isinstance(v, int) else v
                if not e.refs and e.backend is not None and e.expires > now:
                    out.append((key, e.backend, e.expires - now, e.provisional))
                continue
            e = self._unpack(key, v) if isinstance(v, int) else v
            if (
                e.refs
                or e.ticket != (first + j) & _TICKET
                or e.in_prov != prov
                or e.expires <= now
                or e.backend is None
            ):
                continue
            out.append((key, e.backend, e.expires - now, e.provisional))
        return out

    def restore(self, items: Iterable[tuple[int, B, float]], provisional: bool = False) -> int:
        """Load idle entries (key, backend, seconds left); keys already present are left alone.
        Returns how many were loaded. Items in expiry order keep the sweep exact; others are
        loaded all the same (a lookup checks its own entry's expiry)."""
        now = self.clock()
        n = 0
        entries = self._entries
        for key, backend, left in items:
            if left <= 0 or key in entries or len(entries) >= self.max_entries:
                continue
            ref: object = key
            entry: Entry[B] = Entry(key, ref)
            entry.backend = backend
            entry.expires = now + min(left, self.timeout)
            entry.provisional = provisional
            self._place(entry, provisional)
            entries[ref] = self._pack(entry)
            n += 1
        if provisional:
            self._nprov += n
        return n

    def forget(self, key: int) -> bool:
        """Flush one client's pin. An active entry stays (its connections are open) but is
        unpinned, so the client's next connection is scheduled afresh."""
        v = self._entries.get(key)
        if v is None:
            return False
        if not isinstance(v, int) and v.refs:
            v.backend = None
            return True
        self._remove_idle(key, v)
        return True
