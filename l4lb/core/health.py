"""Health verdicts and quorum: pure state machines, fed by the checkers and the dialer.

`Verdict` turns a stream of check results into up/down with keepalived's and HAProxy's rise and
fall: an up backend goes down after `fall` failures in a row, a down one comes up after `rise`
passes in a row; a result against the trend resets the count.

`Quorum` decides when a group hands its traffic to the sorry server: when fewer than `quorum`
backends are up, with keepalived's hysteresis: quorum is lost when up < quorum - hysteresis (or
nothing is up), and regained when up >= quorum + hysteresis. keepalived counts weights; l4lb
counts backends that can take new clients, which says the same with the default weight of 1.
"""

from __future__ import annotations

from dataclasses import dataclass


class Verdict:
    __slots__ = ("failures", "fall", "healthy", "passes", "rise")

    def __init__(self, rise: int, fall: int, healthy: bool = True) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.passes = 0  # in a row, while down
        self.failures = 0  # in a row, while up

    def record(self, ok: bool) -> bool | None:
        """Feed one result; the new verdict when it changed, else None."""
        if self.healthy:
            if ok:
                self.failures = 0
                return None
            self.failures += 1
            if self.failures >= self.fall:
                self.healthy, self.failures = False, 0
                return False
            return None
        if not ok:
            self.passes = 0
            return None
        self.passes += 1
        if self.passes >= self.rise:
            self.healthy, self.passes = True, 0
            return True
        return None

    def force(self, healthy: bool) -> None:
        """Set by someone else (the passive check); counting starts afresh."""
        self.healthy = healthy
        self.passes = self.failures = 0


class Quorum:
    __slots__ = ("hysteresis", "lost", "quorum")

    def __init__(self, quorum: int, hysteresis: int, up: int) -> None:
        self.quorum = quorum
        self.hysteresis = hysteresis
        self.lost = up < quorum or up == 0

    def update(self, up: int) -> bool | None:
        """The new `lost` when it changed, else None."""
        if not self.lost and (up < self.quorum - self.hysteresis or up == 0):
            self.lost = True
            return True
        if self.lost and up >= self.quorum + self.hysteresis and up > 0:
            self.lost = False
            return False
        return None


@dataclass(frozen=True, slots=True)
class Event:
    """A state change: of a backend (`backend` set) or of the group's quorum."""

    time: float  # wall clock, for people
    group: str
    backend: str | None
    old: str
    new: str
    reason: str

    def describe(self) -> str:
        who = f"backend {self.backend}" if self.backend else "sorry server"
        return f"group {self.group}: {who} {self.old} -> {self.new} ({self.reason})"
