"""One connection or flow as one record: `Conn`, what the data plane fills in as things happen
and what everything else reads (the router at its end, the connection log, the API's views;
the hand-over writes it out and reads it back), with its `Phase`; `Routed`, what routing did
for it; and `LogSink`, the writer a router hands a finished record to (`dataplane.accesslog.
AccessLog` is one). Types and two constructors, no I/O.

A TCP connection's record is held by its client socket's protocol (`relay.ClientSide`), a UDP
flow's by its `udp.Flow`; each counts its bytes into it as they pass, so that no reader needs
the sockets. Times are the event loop's clock (`loop.time()`: whole milliseconds under uvloop,
as HAProxy's `now_ms`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol

from .backends import Backend
from .route import Route

# Where a connection is in its life (a flow knows only admitted, dialing, paired, ended). The
# record holds the number, `Phase` names it: a module constant is compiled to a literal, where an
# enum member is a lookup on a Python class (eight a connection cost the relay 1% of its
# instructions).
ADMITTED: Final = 0  # accepted, not yet admitted (a PROXY header awaited) or refused
DIALING: Final = 1  # admitted: a backend is being chosen and connected
PAIRED: Final = 2  # both sockets open, bytes relayed both ways
HALF_CLOSED: Final = 3  # one side sent its FIN; the other direction flows on
CLOSING: Final = 4  # l4lb or a peer closes it; its end is on its way
ENDED: Final = 5  # accounted for (`Router.end`): its line is logged


class Phase(enum.IntEnum):
    """The phases' names, for whoever shows or writes a record (`Phase(conn.phase).name`)."""

    ADMITTED = ADMITTED
    DIALING = DIALING
    PAIRED = PAIRED
    HALF_CLOSED = HALF_CLOSED
    CLOSING = CLOSING
    ENDED = ENDED


@dataclass(frozen=True)
class Routed:
    """What routing did for a connection or flow, as its log line says it: group, service
    port, affinity (`Router.connected`), re-pin reason (for `cid`: the QUIC server ID that
    chose the backend), the backend's name, address and port as dialed (a reload may change
    them later), tries, UDP. Frozen: lines that share one are given one text."""

    group: str
    port: int
    affinity: str
    reason: str
    backend: str
    address: str
    backend_port: int
    tries: int
    udp: bool


def unrouted(group: str, port: int, tries: int, *, udp: bool = False) -> Routed:
    """The `Routed` of a connection or flow that reached no backend."""
    return Routed(group, port, "none", "", "", "", 0, tries, udp)


class Conn:
    """One TCP connection or UDP flow: who, where it went, what it moved, when, how it ended."""

    __slots__ = (
        "backend",
        "bytes_in",
        "bytes_out",
        "connected_at",
        "key",
        "peer",
        "phase",
        "port",
        "route",
        "routed",
        "started",
        "termination",
        "udp",
        "via",
    )

    def __init__(
        self, peer: tuple[str, int] | None, started: float, port: int, *, udp: bool = False
    ) -> None:
        self.peer = peer  # the socket's peer (a flow's client address and port)
        self.started = started  # the accept, or the flow's first datagram
        self.port = port  # the service port it came to
        self.udp = udp
        self.via: tuple[str, int] | None = None  # the client a PROXY header named, if one did
        self.key = 0  # its client network's affinity key, once admitted
        self.route: Route | None = None  # the router's, from admission to its end
        self.backend: Backend | None = None  # the backend it reached
        self.phase = ADMITTED  # (a `Phase`)
        self.connected_at = 0.0
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
        self.routed: Routed | None = None  # None: no backend reached (refused, or none left)
        self.termination = ""

    def end(self, how: str) -> None:
        """The first cause of the end wins (a FIN, then the other side's reset, say)."""
        if not self.termination:
            self.termination = how


class LogSink(Protocol):
    """Where a group's connection log lines go."""

    def log(self, conn: Conn, now: float, *, end: bool) -> None:
        """Queue the line of `conn` at loop time `now` (`end` false: the connection is
        established, not over)."""
