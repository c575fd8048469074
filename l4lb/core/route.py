"""A connection's or flow's route: the router's working state for it, from `Router.begin` to
`Router.end`. Written only by the router's modules (`routing.py`, `quicroute.py`): its callers
read it and ask the router to change it, so that the invariants between the entry, the pin and
the backends' slots are kept in one place (tests/unit/test_shape.py checks it)."""

from __future__ import annotations

from .affinity import Entry
from .backends import Backend


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
        self.queued = False  # it waited for a slot once: it does not wait again
        self.steered = False  # sent by a QUIC connection ID, whatever the pin (`steer`)
