"""End-of-connection accounting for one group: its plain counters (`GroupStats`, read at
scrape time, never labelled per connection), the outcome of a connection that reached a
backend as its log line says it (`reached`), and what a connection or flow leaves in the
counters when it ends (`tally`). `Router.end` calls it; pure, no I/O."""

from __future__ import annotations

from .backends import Backend
from .connection import Conn, Routed
from .histogram import Histogram
from .route import Route

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GroupStats:
    """Plain counters for one group, read at scrape time (never labelled per connection)."""

    __slots__ = (
        "accepted",
        "client_limit",
        "connect",
        "connect_failures",
        "denied",
        "descriptors",
        "duration",
        "failed_refused",
        "failed_timeout",
        "no_backend",
        "rejected",
        "repins_failed",
        "repins_returned",
        "repins_unavailable",
        "sorry",
        "source",
        "unpinned",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0  # clients refused before routing (an address we could not key)
        self.client_limit = 0  # clients refused over their network's client_limits
        self.denied = 0  # clients refused by the group's allow and deny lists
        self.source = 0  # dials that could not come from `source` (this host's setup)
        self.no_backend = 0  # connections closed because no backend accepted them
        self.connect_failures = 0  # single dial attempts that were refused or timed out
        # Connections and flows refused or given up: no descriptor left to take or dial them
        self.descriptors = 0
        self.failed_refused = 0
        self.failed_timeout = 0  # the rest of connect_failures are other socket errors
        self.connect = Histogram(CONNECT_BUCKETS)  # time to connect to a backend
        self.duration = Histogram(DURATION_BUCKETS)  # connections, from accept to close
        self.repins_unavailable = 0  # the pinned backend was down, disabled or removed
        self.repins_failed = 0  # the pinned backend refused or timed out
        self.repins_returned = 0  # on_up: return brought a client back
        self.unpinned = 0  # connections routed without a pin because the table was full
        self.sorry = 0  # connections sent to the sorry server

    @property
    def repins(self) -> int:
        return self.repins_unavailable + self.repins_failed + self.repins_returned


def reached(group: str, conn: Conn, route: Route, affinity: str, backend_port: int) -> Routed:
    """The `Routed` of `conn`, of `group`, that reached `conn.backend` on `backend_port`
    (`affinity`: what `Router.connected` said; for `cid`, the reason's place holds the server
    ID that chose the backend)."""
    backend = conn.backend
    assert backend is not None
    return Routed(
        group,
        conn.port,
        affinity,
        backend.server_id if affinity == "cid" else route.reason,
        backend.name,
        backend.address,
        backend_port,
        len(route.tried),
        conn.udp,
    )


def tally(stats: GroupStats, conn: Conn, now: float, *, given_up: bool) -> None:
    """What `conn` leaves in the counters at its end (loop time `now`): its bytes to the
    backend it reached, and its life in the duration histogram unless no backend took it (a
    refusal or a give-up is counted by its reason, not as a connection's duration)."""
    backend: Backend | None = conn.backend
    if backend is not None:
        backend.bytes_in += conn.bytes_in
        backend.bytes_out += conn.bytes_out
    if not given_up:
        stats.duration.observe(now - conn.started)
