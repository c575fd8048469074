import random

from l4lb.config import load_config_text
from l4lb.core.backends import State
from l4lb.core.routing import Router
from tests.support.helpers import FakeClock

CONFIG = """
groups:
  web:
    ports: [80, 443]
    scheduler: rr
    persistence: {timeout: 60s, netmask: /24, max_entries: 10}
    backends:
      - {name: a, address: 10.0.0.1}
      - {name: b, address: 10.0.0.2}
      - {name: c, address: 10.0.0.3}
"""


def router(text: str = CONFIG) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    return Router(load_config_text(text).groups[0], clock, random.Random(0)), clock


def connect(r: Router, key: int, refuse: tuple[str, ...] = ()) -> str | None:
    """One connection's routing, with the named backends refusing. Left open."""
    route = r.begin(key)
    while (b := r.next_backend(route)) is not None:
        if b.name in refuse:
            r.failed(route, b)
            continue
        r.connected(route, b)
        r.finish(route)
        return b.name
    r.give_up(route)
    return None


def test_pinned_clients_skip_the_scheduler() -> None:
    r, _ = router()
    first = connect(r, 1)
    assert all(connect(r, 1) == first for _ in range(10))
    assert r.table is not None and r.table.hits == 10 and r.table.misses == 1


def test_refusing_pinned_backend_is_repinned_and_counted() -> None:
    r, _ = router()
    first = connect(r, 1)
    assert first is not None
    second = connect(r, 1, refuse=(first,))
    assert second not in (None, first)
    assert r.stats.repins == 1 and r.stats.connect_failures == 1
    assert connect(r, 1) == second  # the new pin holds


def test_down_backend_is_not_even_dialed() -> None:
    r, _ = router()
    first = connect(r, 1)
    r.by_name[first].set_healthy(False)  # type: ignore[index]
    assert connect(r, 1) != first
    assert r.stats.connect_failures == 0 and r.stats.repins == 1


def test_drained_backend_keeps_its_pins_but_takes_no_new_clients() -> None:
    r, _ = router()
    first = connect(r, 1)
    r.by_name[first].set_admin(State.DRAIN)  # type: ignore[index]
    assert connect(r, 1) == first
    assert all(connect(r, k) != first for k in range(2, 9))


def test_all_refusing_gives_up_and_keeps_the_old_pin() -> None:
    r, _ = router()
    first = connect(r, 1)
    assert connect(r, 1, refuse=("a", "b", "c")) is None
    assert r.stats.connect_failures == 3  # (no_backend is counted by dataplane/path.py)
    assert connect(r, 1) == first
    assert all(b.active == 0 for b in r.backends)


def test_a_new_entry_whose_dials_all_fail_is_not_kept() -> None:
    r, _ = router()
    assert connect(r, 5, refuse=("a", "b", "c")) is None
    assert r.table is not None and r.table.get(5) is None


def test_concurrent_first_connections_share_the_tentative_pin() -> None:
    r, _ = router()
    one, two = r.begin(9), r.begin(9)
    b1 = r.next_backend(one)
    b2 = r.next_backend(two)
    assert b1 is b2
    assert b1 is not None and b1.active == 2


def test_persistence_off_schedules_every_connection() -> None:
    r, _ = router(CONFIG.replace("timeout: 60s", "timeout: 0"))
    assert r.table is None
    assert {connect(r, 1) for _ in range(3)} == {"a", "b", "c"}


def test_full_table_of_busy_entries_routes_unpinned() -> None:
    r, _ = router(CONFIG.replace("max_entries: 10", "max_entries: 1"))
    busy = r.begin(1)
    assert r.next_backend(busy) is not None
    assert connect(r, 2) is not None
    assert r.stats.unpinned == 1


def test_a_new_pin_and_a_repin_are_fresh_for_the_shared_store_a_known_one_is_not() -> None:
    r, _ = router()
    route = r.begin(0x0A000100)
    first = r.next_backend(route)
    assert first is not None and route.fresh and route.shared == ""
    r.connected(route, first)
    r.finish(route)
    route = r.begin(0x0A000100)
    assert r.next_backend(route) is first and not route.fresh
    r.finish(route)
    r.set_health(first, False, "test")
    route = r.begin(0x0A000100)
    moved = r.next_backend(route)
    assert moved is not first and route.fresh and route.shared == first.name
    r.finish(route)


def test_swap_moves_the_dial_the_slot_and_the_pin() -> None:
    r, _ = router()
    route = r.begin(0x0A000200)
    candidate = r.next_backend(route)
    assert candidate is not None
    other = next(b for b in r.backends if b is not candidate)
    r.swap(route, other)
    assert (candidate.active, other.active) == (0, 1)
    assert route.backend is other and route.entry is not None and route.entry.backend is other
    assert candidate not in route.tried  # still worth a try if the other refuses
    r.failed(route, other)
    assert r.next_backend(route) is not None
    r.finish(route)


def test_consistent_is_rendezvous_over_the_schedulable_or_the_groups_own_hash() -> None:
    r, _ = router()
    keys = range(0x0A000000, 0x0A000000 + 300 * 256, 256)
    before = {k: r.consistent(k) for k in keys}
    a = r.by_name["a"]
    r.set_health(a, False, "test")
    assert any(b is a for b in before.values())
    for k in keys:  # only a's keys move, and never to a
        now = r.consistent(k)
        assert now is not a
        if before[k] is not a:
            assert now is before[k]
    mh, _ = router(CONFIG.replace("scheduler: rr", "scheduler: mh"))
    assert all(mh.consistent(k) is mh.scheduler.pick(k) for k in keys)
