"""What a connection or flow did, for its line in the connection log: the `Record` the data
plane fills in as things happen, routing's outcome (`Routed`), and `LogSink`, the writer a
router is given (`dataplane.accesslog.AccessLog` is one). Types and two constructors, no I/O:
the router ends a connection by handing its record to the sink (`Router.end`), and
`routing.reached` makes the outcome of a dial that reached a backend."""

from __future__ import annotations

from typing import Protocol

# What routing did for a connection or flow, as its line says it: group, service port, affinity
# (`Router.connected`), re-pin reason (for `cid`: the QUIC server ID), backend name, backend
# address and port (as dialed: a reload may change them later), tries, UDP. Rows that share one
# are given one text.
Routed = tuple[str, int, str, str, str, str, int, int, bool]


class Record:
    """What one connection or flow did, for its log line. Times are the event loop's clock
    (`loop.time()`: whole milliseconds under uvloop, as HAProxy's `now_ms`); the client a PROXY
    header named is the connection's own `client_addr`, handed to `AccessLog.log`."""

    __slots__ = ("connected_at", "peer", "routed", "started", "termination")

    def __init__(self, peer: tuple[str, int] | None, started: float) -> None:
        self.peer = peer  # the socket's peer
        self.started = started  # the accept, or the flow's first datagram
        self.connected_at = 0.0
        self.routed: Routed | None = None  # None: no backend reached (refused, or none left)
        self.termination = ""

    def end(self, how: str) -> None:
        """The first cause of the end wins (a FIN, then the other side's reset, say)."""
        if not self.termination:
            self.termination = how


class LogSink(Protocol):
    """Where a group's connection log lines go."""

    def log(
        self,
        rec: Record,
        now: float,
        via: tuple[str, int] | None,
        bytes_in: int,
        bytes_out: int,
        end: bool,
    ) -> None:
        """Queue the line of `rec` at loop time `now` (`via`: the client a PROXY header named,
        if any; `end` false: the connection is established, not over)."""


def unrouted(group: str, port: int, tries: int, udp: bool = False) -> Routed:
    """The `Routed` of a connection or flow that reached no backend."""
    return (group, port, "none", "", "", "", 0, tries, udp)
