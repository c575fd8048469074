"""Health state on its own: a verdict's rise and fall, the quorum with its hysteresis."""

from __future__ import annotations

from l4lb.core.health import Quorum, Verdict


def test_verdict_rise_and_fall() -> None:
    v = Verdict(rise=2, fall=3)
    assert [v.record(False), v.record(False), v.record(True), v.record(False), v.record(False)] == [
        None
    ] * 5
    assert v.record(False) is False and not v.healthy
    assert v.record(True) is None and v.record(False) is None  # a failure resets the rise count
    assert v.record(True) is None and v.record(True) is True and v.healthy


def test_quorum_with_hysteresis() -> None:
    q = Quorum(quorum=3, hysteresis=1, up=4)
    assert not q.lost
    assert q.update(3) is None and q.update(2) is None  # 2 is not below 3 - 1
    assert q.update(1) is True and q.lost
    assert q.update(3) is None  # regained only at 3 + 1
    assert q.update(4) is False and not q.lost
    q0 = Quorum(quorum=1, hysteresis=0, up=1)
    assert q0.update(0) is True and q0.update(1) is False
