"""client_limits' rate buckets on their own, with a fake clock."""

from __future__ import annotations

from l4lb.config import ClientLimitsSpec
from l4lb.core.limits import MAX_TRACKED, ClientLimits
from tests.support.helpers import (
    FakeClock,
)


def test_rate_is_a_token_bucket_with_a_burst() -> None:
    clock = FakeClock()
    limits = ClientLimits(ClientLimitsSpec(rate=10.0, burst=5), clock)
    assert [limits.admit(7) for _ in range(6)] == [None] * 5 + ["rate"]
    clock.advance(0.1)  # one token back
    assert limits.admit(7) is None and limits.admit(7) == "rate"
    clock.advance(10)  # full again, and forgotten: a full bucket is no state at all
    assert limits.tracked == 1  # (the open count: nothing released)
    assert [limits.admit(7) for _ in range(6)] == [None] * 5 + ["rate"]


def test_a_flood_of_sources_stays_within_the_bound() -> None:
    clock = FakeClock()
    limits = ClientLimits(ClientLimitsSpec(rate=1.0, burst=1), clock)
    for key in range(MAX_TRACKED + 5000):
        assert limits.admit(key) is None
        limits.release(key)
    assert limits.tracked == MAX_TRACKED and limits.open == {}
