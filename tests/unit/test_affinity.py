import pytest

from l4lb.core.affinity import AffinityTable
from tests.support.helpers import FakeClock


def table(timeout: float = 60, max_entries: int = 100) -> tuple[AffinityTable[str], FakeClock]:
    clock = FakeClock()
    return AffinityTable(timeout, max_entries, clock), clock


def pin(t: AffinityTable[str], key: int, backend: str) -> None:
    e = t.acquire(key)
    assert e is not None
    e.backend = backend
    t.release(e)


def test_miss_then_hit() -> None:
    t, _ = table()
    e = t.acquire(1)
    assert e is not None and e.backend is None and t.misses == 1
    e.backend = "a"
    t.release(e)
    e2 = t.acquire(1)
    assert e2 is not None and e2.key == 1 and e2.backend == "a" and t.hits == 1


def test_expires_timeout_after_last_close() -> None:
    t, clock = table(timeout=60)
    pin(t, 1, "a")
    clock.advance(59.9)
    e = t.acquire(1)
    assert e is not None and e.backend == "a"
    clock.advance(30)  # held open: the clock does not run against it
    t.release(e)  # the close restarts the 60 s
    clock.advance(59.9)
    assert t.get(1) is not None
    clock.advance(0.2)
    assert t.get(1) is None
    e = t.acquire(1)
    assert e is not None and e.backend is None
    assert t.expirations == 1


def test_entry_held_by_open_connection_never_expires() -> None:
    t, clock = table(timeout=10)
    e = t.acquire(7)
    assert e is not None
    e.backend = "b"
    clock.advance(10_000)
    assert t.expire() == 0
    e2 = t.acquire(7)
    assert e2 is e and e2.backend == "b" and e2.refs == 2
    t.release(e2)
    t.release(e)
    assert t.idle_count == 1 and t.active_count == 0


def test_never_pinned_entry_is_not_kept() -> None:
    t, _ = table()
    e = t.acquire(3)
    assert e is not None
    t.release(e)
    assert len(t) == 0


def test_full_table_evicts_oldest_idle() -> None:
    t, clock = table(max_entries=3)
    for k in (1, 2, 3):
        pin(t, k, f"b{k}")
        clock.advance(1)
    pin(t, 4, "b4")
    assert t.evictions == 1
    assert t.get(1) is None
    assert {e.key for e in t.entries()} == {2, 3, 4}


def test_busy_entries_are_never_evicted_and_overflow_is_unpinned() -> None:
    t, _ = table(max_entries=2)
    a, b = t.acquire(1), t.acquire(2)
    assert a is not None and b is not None
    a.backend = b.backend = "x"
    assert t.acquire(3) is None
    assert t.overflows == 1
    assert t.acquire(1) is a  # existing busy entries still hit
    t.release(a)
    t.release(a)
    assert t.acquire(3) is not None  # the idle one can now go
    assert t.evictions == 1 and t.get(1) is None


def test_forget() -> None:
    t, _ = table()
    pin(t, 1, "a")
    assert t.forget(1) and t.get(1) is None
    e = t.acquire(2)
    assert e is not None
    e.backend = "a"
    assert t.forget(2)  # busy: stays, but unpinned
    assert e.backend is None
    assert not t.forget(99)


def test_zero_timeout_is_refused() -> None:
    with pytest.raises(ValueError):
        AffinityTable(0, 10, FakeClock())


def test_an_expired_entry_is_a_miss_even_between_sweeps() -> None:
    t, clock = table(timeout=0.5)
    pin(t, 1, "a")
    clock.advance(0.1)
    pin(t, 2, "b")  # this lookup sweeps; the next sweep is a second away
    clock.advance(0.45)  # key 1 expired 0.05 s ago, before any new sweep
    e = t.acquire(1)
    assert e is not None and e.backend is None
    assert t.expirations == 1 and t.misses == 3


def test_throttle_holds_back_and_counts() -> None:
    from l4lb.core.throttle import Throttle

    clock = FakeClock()
    t = Throttle(1.0, clock)
    assert t.allow("a") == 0
    assert [t.allow("a") for _ in range(5)] == [None] * 5
    assert t.allow("b") == 0  # keys are independent
    clock.advance(1.0)
    assert t.allow("a") == 5
    assert t.allow("a") is None


def test_what_became_active_or_was_released_since_a_moment() -> None:
    t, clock = table(timeout=60)
    pin(t, 1, "a")  # released at 1000
    t.released = []  # a shared store starts listening
    clock.advance(5)
    pin(t, 2, "b")  # released at 1005
    e1 = t.acquire(1)  # active again at 1005
    clock.advance(5)
    e3 = t.acquire(3)  # new at 1010
    assert e1 is not None and e3 is not None
    assert [e.key for e in t.activated_since(1005)] == [3, 1]
    assert [e.key for e in t.activated_since(1006)] == [3]
    assert t.take_released() == [2]  # released since the store listened
    assert t.take_released() == []
    assert [e.key for e in t.active()] == [1, 3]


def test_provisional_entries_never_evict_a_confirmed_pin() -> None:
    """A UDP flow's entry is provisional until the flow is validated: when the table is full it
    may only take an idle provisional entry's place (else it goes unpinned); a confirmed entry
    evicts idle provisional ones first; a confirmed acquire or `confirm` makes it confirmed."""
    clock = FakeClock()
    t: AffinityTable[str] = AffinityTable(60, 4, clock)
    for key in (1, 2):  # two TCP clients, pinned, gone idle
        pin(t, key, "tcp")
    flows = [t.acquire(10 + i, provisional=True) for i in range(2)]  # two forged sources
    assert all(e is not None and e.provisional for e in flows)
    assert t.acquire(20, provisional=True) is None  # full: it may not evict a TCP pin
    assert t.get(1) is not None and t.get(2) is not None and t.overflows == 1
    for e in flows:  # their flows end: idle provisional entries
        assert e is not None
        e.backend = "udp"
        t.release(e)
    later = t.acquire(21, provisional=True)  # takes the oldest provisional's place
    assert later is not None and t.get(10) is None and t.get(1) is not None
    tcp = t.acquire(30)  # a new TCP client: evicts the remaining idle provisional first
    assert tcp is not None and not tcp.provisional and t.get(11) is None
    assert t.get(1) is not None and t.get(2) is not None
    t.confirm(later)  # its client spoke again after an answer
    assert not later.provisional
    again = t.acquire(21)  # (and a confirmed acquire confirms too)
    assert again is later and not again.provisional


def test_idle_provisional_entries_are_a_bounded_pool() -> None:
    clock = FakeClock()
    t: AffinityTable[str] = AffinityTable(60, 8, clock)  # a pool of 8 // 4 = 2
    for key in range(5):
        e = t.acquire(key, provisional=True)
        assert e is not None
        e.backend = "udp"
        t.release(e)
    assert len(t) == 2 and t.get(3) is not None and t.get(4) is not None
    assert t.evictions == 3


def test_a_busy_client_keeps_one_place_and_is_not_the_first_evicted() -> None:
    """An idle entry is stored packed and ordered by a queue of keys: a client that connects
    again and again keeps one place (the queue does not grow with its connections), and a full
    table evicts the client idle the longest, not the busy one whose first place is oldest."""
    t, clock = table(timeout=60, max_entries=3)
    for k in (1, 2, 3):
        pin(t, k, f"b{k}")
        clock.advance(1)
    for _ in range(1000):  # client 1 keeps coming back
        e = t.acquire(1)
        assert e is not None and e.backend == "b1"
        t.release(e)
    assert len(t._order) <= 4
    pin(t, 4, "b4")  # full: the oldest idle is client 2
    assert t.get(2) is None and t.get(1) is not None and t.evictions == 1


def test_a_flushed_key_pinned_again_is_swept_at_its_own_time() -> None:
    t, clock = table(timeout=10)
    pin(t, 1, "a")
    assert t.forget(1) and t.get(1) is None
    clock.advance(5)
    pin(t, 1, "b")  # a new place; the old one is a ghost
    clock.advance(6)
    assert t.expire() == 0 and t.get(1) is not None and t.get(1).backend == "b"  # type: ignore[union-attr]
    clock.advance(5)
    assert t.expire() == 1 and len(t) == 0 and not t._order


def test_a_mass_expiry_is_swept_in_slices() -> None:
    t, clock = table(timeout=10, max_entries=20_000)
    t.restore((k, "a", 5.0) for k in range(10_000))
    assert len(t) == 10_000
    clock.advance(6)
    assert t.expire() == t.SWEEP_SLICE  # one slice, not the whole table at once
    while t.expire():
        pass
    assert len(t) == 0


def test_an_idle_entry_can_be_repinned_and_restored_entries_keep_their_time() -> None:
    t, clock = table(timeout=60)
    assert t.restore([(1, "a", 30.0), (2, "a", 0.0), (3, "b", 90.0)]) == 2  # 2 had expired
    assert t.repin(1, "c") and not t.repin(9, "c")
    e = t.get(1)
    assert e is not None and e.backend == "c" and 29.9 < e.expires - clock() <= 30.01
    e3 = t.get(3)
    assert e3 is not None and 59.9 < e3.expires - clock() <= 60.01  # capped at the timeout


def test_an_idle_entry_costs_at_most_150_bytes() -> None:
    """Issue 24, point 6: counted by tracemalloc (every allocation the entries make: the dict,
    the packed ints, the keys, the queue), not by a clock. It was about 490 bytes."""
    import tracemalloc

    n = 200_000
    t, clock = table(timeout=600, max_entries=n)
    backends = ["a", "b", "c"]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):  # as connections leave them: acquired, pinned, released
            e = t.acquire((10 << 24) + (i << 8))
            assert e is not None
            e.backend = backends[i % 3]
            t.release(e)
        clock.advance(2)  # a released entry is packed a second after (it may come back)
        while t._young:
            t.expire()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
        print(f"{per_entry:.0f} bytes per entry")
    finally:
        tracemalloc.stop()
    assert len(t) == n and t.idle_count == n
    assert per_entry <= 150, per_entry


def test_a_released_entry_is_packed_a_second_later_unless_it_came_back() -> None:
    t, clock = table(timeout=60)
    pin(t, 1, "a")
    pin(t, 2, "b")
    assert not isinstance(t._entries[1], int)  # young: an object still
    e = t.acquire(2)  # back at once: the same object, nothing unpacked
    assert e is not None and e.backend == "b"
    clock.advance(t.YOUNG + 0.5)
    t.expire()
    assert isinstance(t._entries[1], int)  # idle for a second: packed
    assert not isinstance(t._entries[2], int) and t._entries[2] is e  # active
    t.release(e)
    again = t.get(1)
    assert again is not None and again.backend == "a" and 58 < again.expires - clock() <= 60


def test_ordered_since_lists_what_changed_after_a_mark() -> None:
    """An upgrade walks the table while it serves, then sends only what changed after that
    walk began (`mark`): every active entry, and every entry released since (a pin released or
    re-pinned after the mark, whatever its place), never the idle entries that did not move."""
    t, _ = table()
    for key in (1, 2, 3):  # idle before the mark
        pin(t, key, "a")
    busy = t.acquire(4)
    assert busy is not None
    busy.backend = "b"
    t.mark()
    pin(t, 2, "c")  # a client of 2 comes back, is re-pinned, leaves: its place is its old one
    pin(t, 5, "d")
    rows = [
        (key, backend)
        for keys, first, prov in t.ordered_since()
        for key, backend, _left, _prov in t.export_places(keys, first, prov)
    ]
    assert sorted(rows) == [(2, "c"), (4, "b"), (5, "d")]
