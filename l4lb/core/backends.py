"""Backends as the balancer sees them at run time: identity, weight, state and live counters.

Pure data: no sockets, no loop. A backend's state combines the operator's word (`admin`: up,
drain or disabled) with the health checks' verdict (`healthy`); the effective state is the worst
of the two: disabled, then down, then drain (also weight 0), then up.

`eff` is the weight the weighted schedulers (wrr, wlc, p2c) use: the weight itself, except while
a backend that came back ramps up (`slow_start`, driven by the router's clock), from 10% of it
to all of it. The consistent hashes (sh, mh, rendezvous) use the weight: every instance must
compute them alike, and ramps are local.

The two flags the hot path reads are stored, not computed, and are kept right by every setter:
- `schedulable`: the scheduler may send a new client here (up, weight > 0, not full);
- `accepts_pinned`: a client already pinned here may keep coming: up or draining (weight 0
  keeps pins, as LVS quiescence and HAProxy drain do), or failed with `inhibit_on_failure`
  (keepalived's weight-0 instead of removal, pins included).
"""

from __future__ import annotations

from enum import StrEnum

from .keys import hash_name
from .spec import BackendSpec


class State(StrEnum):
    UP = "up"
    DOWN = "down"  # failed checks: no new clients, pins move on the next connection
    DRAIN = "drain"  # operator or weight 0: no new clients, pinned clients keep coming
    DISABLED = "disabled"  # operator maintenance: like down


class Backend:
    __slots__ = (
        "accepts_pinned",
        "active",
        "address",
        "admin",
        "backup",
        "bytes_in",
        "bytes_out",
        "changed_at",
        "connect_failures",
        "connections",
        "down_since",
        "down_total",
        "eff",
        "failed_refused",
        "failed_timeout",
        "failures_in_row",
        "healthy",
        "hostname",
        "index",
        "inhibit",
        "max_conns",
        "may_loop",
        "name",
        "peak",
        "ports",
        "ramp_since",
        "removed",
        "schedulable",
        "seed",
        "send_proxy",
        "server_id",
        "slow_start",
        "udp_ports",
        "unresolved",
        "waiting",
        "weight",
    )

    def __init__(self, spec: BackendSpec, index: int = 0) -> None:
        self.name = spec.name
        self.seed = hash_name(spec.name, "hrw")  # its rendezvous identity, the same everywhere
        self.address = spec.address
        # On this host's loopback: its dials are remembered, to tell one that comes back to
        # l4lb itself (a backend pointing at a listener of ours) from a client.
        # Whether a dial here could come back to l4lb (set by the server: a local address, and
        # a port of ours or kernel marks): such dials are remembered, to tell one from a client.
        self.may_loop = False
        self.ports = dict(spec.ports)
        self.udp_ports = dict(spec.udp_ports)
        self.weight = spec.weight
        self.eff: float = float(spec.weight)
        self.slow_start = spec.slow_start  # None: as the group says
        self.ramp_since: float | None = None  # when a ramp (slow start) began
        self.max_conns = spec.max_conns
        self.inhibit = spec.inhibit_on_failure
        self.backup = spec.backup  # new clients only when no other backend can take one
        self.send_proxy = spec.send_proxy  # None: as the group says
        self.server_id = spec.server_id  # QUIC-LB, hex ("": none)
        self.index = index  # position in the group's list; schedulers use it for ties
        self.admin = State(spec.state)
        self.hostname = spec.hostname  # the DNS name it was resolved from, if any
        self.unresolved = spec.unresolved  # why that name has no address: down, never dialed
        self.healthy = not spec.unresolved
        self.removed = False
        self.active = 0  # open or dialing connections
        self.peak = 0  # the most `active` has been
        self.changed_at = 0.0  # wall time of the last state change (the router keeps these)
        self.down_since: float | None = None  # wall time it went down or disabled
        self.down_total = 0.0  # seconds down or disabled before `down_since`
        self.waiting = 0  # pinned clients queued for a free slot
        self.connections = 0  # connections established, ever
        self.connect_failures = 0
        self.failed_refused = 0  # of connect_failures; the rest timed out or other errors
        self.failed_timeout = 0
        self.failures_in_row = 0  # consecutive connect failures (passive checks)
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.schedulable = False
        self.accepts_pinned = False
        self.refresh()

    @property
    def state(self) -> State:
        if self.admin is State.DISABLED:
            return State.DISABLED
        if not self.healthy:
            return State.DOWN
        if self.admin is State.DRAIN or self.weight == 0:
            return State.DRAIN
        return State.UP

    @property
    def full(self) -> bool:
        return 0 < self.max_conns <= self.active

    def port_for(self, service_port: int) -> int:
        return self.ports.get(service_port, service_port)

    def udp_port_for(self, service_port: int) -> int:
        return self.udp_ports.get(service_port, service_port)

    def set_admin(self, state: State) -> None:
        if state is State.DOWN:
            raise ValueError("'down' is the health checks' verdict, not an operator state")
        self.admin = state
        self.refresh()

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self.refresh()

    def set_weight(self, weight: int) -> None:
        self.weight = weight
        if self.ramp_since is None:
            self.eff = float(weight)
        self.refresh()

    def note_state(self, now: float) -> None:
        """The state changed at wall time `now`: keep the time of the change and the downtime
        (down or disabled)."""
        self.changed_at = now
        out = self.state in (State.DOWN, State.DISABLED)
        if out and self.down_since is None:
            self.down_since = now
        elif not out and self.down_since is not None:
            self.down_total += now - self.down_since
            self.down_since = None

    def downtime(self, now: float) -> float:
        return self.down_total + (now - self.down_since if self.down_since is not None else 0.0)

    def ramp(self, now: float, duration: float) -> bool:
        """Set `eff` for a ramp begun at `ramp_since`: 10% of the weight at once, then linearly
        up to all of it over `duration`. False once the ramp is over (and `eff` is the weight)."""
        since = self.ramp_since
        if since is None or duration <= 0 or now - since >= duration:
            self.ramp_since = None
            self.eff = float(self.weight)
            return False
        self.eff = self.weight * (0.1 + 0.9 * max(0.0, now - since) / duration)
        return True

    def remove(self) -> None:
        """Taken out of the configuration: never chosen, and its pins move on."""
        self.removed = True
        self.refresh()

    def take_slot(self) -> None:
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        if self.max_conns and self.active >= self.max_conns:
            self.refresh()

    def free_slot(self) -> None:
        self.active -= 1
        if self.max_conns and self.active == self.max_conns - 1:
            self.refresh()

    def update(self, spec: BackendSpec, previous: BackendSpec, index: int) -> None:
        """Apply a reloaded spec. Weight and operator state change only when the file changed
        them, so that a reload does not undo what an operator set at run time."""
        self.address = spec.address
        self.hostname = spec.hostname
        self.unresolved = spec.unresolved
        self.ports = dict(spec.ports)
        self.udp_ports = dict(spec.udp_ports)
        self.max_conns = spec.max_conns
        self.inhibit = spec.inhibit_on_failure
        self.backup = spec.backup
        self.send_proxy = spec.send_proxy
        self.server_id = spec.server_id
        self.slow_start = spec.slow_start
        self.index = index
        if spec.weight != previous.weight:
            self.weight = spec.weight
            if self.ramp_since is None:
                self.eff = float(spec.weight)
        if spec.state != previous.state:
            self.admin = State(spec.state)
        self.refresh()

    def rename(self, name: str) -> None:
        """The same backend under a new name (its DNS name's backends were renamed): its pins
        and counters stay; its rendezvous identity is the new name's, as on every instance."""
        self.name = name
        self.seed = hash_name(name, "hrw")

    def refresh(self) -> None:
        alive = not self.removed and self.admin is not State.DISABLED and not self.unresolved
        self.schedulable = (
            alive and self.healthy and self.admin is State.UP and self.weight > 0 and not self.full
        )
        self.accepts_pinned = alive and (self.healthy or self.inhibit)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.address}, w={self.weight}, {self.state.value})"
