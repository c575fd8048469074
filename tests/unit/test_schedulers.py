import random
from collections import Counter

import pytest

from l4lb.config import BackendSpec
from l4lb.core.backends import Backend, State
from l4lb.core.schedulers import SCHEDULER_CLASSES, make_scheduler


def pool(*weights: int) -> list[Backend]:
    return [Backend(BackendSpec(f"b{i}", f"10.0.0.{i + 1}", w), i) for i, w in enumerate(weights)]


def share(name: str, bs: list[Backend], n: int = 6000, keys: bool = True) -> Counter[str]:
    s = make_scheduler(name, bs, random.Random(1))
    c: Counter[str] = Counter()
    for k in range(n):
        b = s.pick(k * 7919 if keys else 0)
        assert b is not None
        c[b.name] += 1
    return c


@pytest.mark.parametrize("name", sorted(SCHEDULER_CLASSES))
def test_every_scheduler_skips_unavailable_weight_zero_and_excluded(name: str) -> None:
    bs = pool(1, 1, 0, 1, 1)
    bs[0].set_healthy(False)
    bs[1].set_admin(State.DRAIN)
    bs[3].remove()
    s = make_scheduler(name, bs, random.Random(2))
    for k in range(500):
        assert s.pick(k) is bs[4]
    assert s.pick(1, [bs[4]]) is None
    bs[4].set_admin(State.DISABLED)
    assert s.pick(3) is None


@pytest.mark.parametrize("name", sorted(SCHEDULER_CLASSES))
def test_every_scheduler_returns_none_on_an_empty_pool(name: str) -> None:
    assert make_scheduler(name, [], random.Random(0)).pick(5) is None


def test_rr_is_equal() -> None:
    assert set(share("rr", pool(1, 5, 1), 3000).values()) == {1000}


def test_wrr_is_proportional_and_smooth() -> None:
    bs = pool(5, 1, 1)
    s = make_scheduler("wrr", bs, random.Random(0))
    seq = "".join(s.pick(0).name[-1] for _ in range(7))  # type: ignore[union-attr]
    assert sorted(seq) == sorted("0000012")
    assert "000" not in seq  # nginx's smooth order: a a b a c a a
    assert share("wrr", pool(3, 2, 1), 6000) == {"b0": 3000, "b1": 2000, "b2": 1000}


def test_lc_picks_fewest_connections_and_spreads_ties() -> None:
    bs = pool(1, 1, 1)
    bs[0].active, bs[1].active, bs[2].active = 5, 2, 7
    s = make_scheduler("lc", bs, random.Random(0))
    assert s.pick(0) is bs[1]
    for b in bs:
        b.active = 0
    assert {s.pick(0).name for _ in range(3)} == {"b0", "b1", "b2"}  # type: ignore[union-attr]


def test_wlc_weighs_connections() -> None:
    bs = pool(1, 3)
    s = make_scheduler("wlc", bs, random.Random(0))
    # Simulate long-lived connections: the heavier backend carries three times the load.
    for _ in range(400):
        b = s.pick(0)
        assert b is not None
        b.active += 1
    assert bs[0].active == 100 and bs[1].active == 300


def test_sh_is_deterministic_weighted_and_falls_back() -> None:
    bs = pool(1, 1, 2)
    c = share("sh", bs, 8000)
    assert abs(c["b2"] / 8000 - 0.5) < 0.05
    assert abs(c["b0"] / 8000 - 0.25) < 0.05
    s1, s2 = make_scheduler("sh", bs, random.Random(1)), make_scheduler("sh", pool(1, 1, 2))
    assert all(s1.pick(k).name == s2.pick(k).name for k in range(300))  # type: ignore[union-attr]
    before = {k: s1.pick(k) for k in range(3000)}
    bs[0].set_healthy(False)
    moved = [k for k in range(3000) if s1.pick(k) is not before[k]]
    assert all(before[k] is bs[0] for k in moved)  # only the failed backend's clients move


def test_mh_balances_and_disrupts_minimally() -> None:
    bs = pool(1, 1, 1, 1)
    c = share("mh", bs, 20000)
    for n in c.values():
        assert abs(n / 20000 - 0.25) < 0.03
    s = make_scheduler("mh", bs)
    before = {k: s.pick(k) for k in range(20000)}
    bs[2].set_healthy(False)  # a failure: the table stays, the slot is skipped
    moved = [k for k in before if s.pick(k) is not before[k]]
    assert all(before[k] is bs[2] for k in moved)
    assert 0.2 < len(moved) / 20000 < 0.3
    # Removing a backend from the configuration rebuilds the table: Maglev moves little else.
    bs2 = pool(1, 1, 1, 1)
    full = make_scheduler("mh", bs2)
    ref = {k: full.pick(k).name for k in range(20000)}  # type: ignore[union-attr]
    fewer = make_scheduler("mh", bs2[:3])
    changed = sum(1 for k in ref if fewer.pick(k).name != ref[k])  # type: ignore[union-attr]
    assert changed / 20000 < 0.25 + 0.05  # the removed quarter plus a little churn


def test_mh_is_weighted_and_stable_across_instances() -> None:
    c = share("mh", pool(1, 3), 20000)
    assert abs(c["b1"] / 20000 - 0.75) < 0.03
    a, b = make_scheduler("mh", pool(1, 1, 1)), make_scheduler("mh", pool(1, 1, 1))
    assert all(a.pick(k).name == b.pick(k).name for k in range(1000))  # type: ignore[union-attr]


def test_p2c_is_weighted_and_prefers_the_less_loaded() -> None:
    c = share("p2c", pool(1, 3), 8000, keys=False)
    assert 0.6 < c["b1"] / 8000 < 0.9
    bs = pool(1, 1)
    bs[0].active = 10
    s = make_scheduler("p2c", bs, random.Random(3))
    picks = Counter(s.pick(0).name for _ in range(1000))  # type: ignore[union-attr]
    assert picks["b1"] > 700  # b0 wins only when both draws land on it


def test_fo_takes_the_highest_weight_then_fails_over() -> None:
    bs = pool(5, 10, 10, 1)
    s = make_scheduler("fo", bs)
    assert s.pick(0) is bs[1]
    bs[1].set_healthy(False)
    assert s.pick(0) is bs[2]
    bs[2].set_healthy(False)
    assert s.pick(0) is bs[0]
    assert s.pick(0, [bs[0]]) is bs[3]
