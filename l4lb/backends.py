"""Backends as the balancer sees them at run time: identity, weight, state and live counters.

Pure data: no sockets, no loop. The two flags the hot path reads are stored, not computed, and
are kept right by `set_state` and `set_weight`:
- `schedulable`: the scheduler may send a new client here (state up, weight > 0);
- `accepts_pinned`: a client already pinned here may keep coming (up, or drain: weight 0 keeps
  pins, as LVS quiescence and HAProxy drain do).
"""

from __future__ import annotations

from enum import StrEnum

from .config import BackendSpec


class State(StrEnum):
    UP = "up"
    DOWN = "down"  # failed checks: no new clients, pins move on the next connection
    DRAIN = "drain"  # operator: no new clients, pinned clients keep coming
    DISABLED = "disabled"  # operator maintenance: like down


_PINNABLE = (State.UP, State.DRAIN)


class Backend:
    __slots__ = (
        "accepts_pinned",
        "active",
        "address",
        "bytes_in",
        "bytes_out",
        "connect_failures",
        "connections",
        "index",
        "name",
        "ports",
        "removed",
        "schedulable",
        "state",
        "weight",
    )

    def __init__(self, spec: BackendSpec, index: int = 0) -> None:
        self.name = spec.name
        self.address = spec.address
        self.ports = dict(spec.ports)
        self.weight = spec.weight
        self.index = index  # position in the group's list; schedulers use it for ties
        self.state = State.UP
        self.removed = False
        self.active = 0  # open or dialing connections
        self.connections = 0  # connections established, ever
        self.connect_failures = 0
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.schedulable = False
        self.accepts_pinned = False
        self._refresh()

    def port_for(self, service_port: int) -> int:
        return self.ports.get(service_port, service_port)

    def set_state(self, state: State) -> None:
        self.state = state
        self._refresh()

    def set_weight(self, weight: int) -> None:
        self.weight = weight
        self._refresh()

    def remove(self) -> None:
        """Taken out of the configuration: never chosen, and its pins move on."""
        self.removed = True
        self._refresh()

    def _refresh(self) -> None:
        alive = not self.removed
        self.schedulable = alive and self.state is State.UP and self.weight > 0
        self.accepts_pinned = alive and self.state in _PINNABLE

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.address}, w={self.weight}, {self.state.value})"
