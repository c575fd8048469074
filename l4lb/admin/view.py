"""The running process as the admin API and the metrics read it: a Protocol that
`runtime.Runtime` satisfies, so the control plane depends on what it reads, not on the server
(Envoy's `ClusterManager` interface, hypercorn's `typing.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..checks.monitor import HealthMonitor
from ..core.flowstats import UdpStats
from ..core.routing import Router
from ..dataplane.store import StoreStats
from ..runtime.pair import Pair


class LogCounts(Protocol):
    @property
    def written(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class PlaneCounts(Protocol):
    @property
    def accept_errors(self) -> Mapping[str, int]: ...

    @property
    def loops(self) -> int: ...

    @property
    def unmatched_marks(self) -> int: ...

    @property
    def yielded(self) -> int: ...


class StoreView(Protocol):
    @property
    def up(self) -> bool: ...

    @property
    def stats(self) -> StoreStats: ...


class Balancer(Protocol):
    """What the admin API reads (and the two things it asks: a reload, an upgrade)."""

    @property
    def routers(self) -> Mapping[str, Router]: ...

    @property
    def monitor(self) -> HealthMonitor: ...

    @property
    def plane(self) -> PlaneCounts: ...

    @property
    def store(self) -> StoreView | None: ...

    @property
    def udp_stats(self) -> Mapping[str, UdpStats]: ...

    @property
    def access_logs(self) -> Mapping[tuple[str, str], LogCounts]: ...

    @property
    def history(self) -> Iterable[dict[str, Any]]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def started_at(self) -> float: ...

    @property
    def reloads_ok(self) -> int: ...

    @property
    def reloads_failed(self) -> int: ...

    @property
    def admin_refused(self) -> dict[str, int]: ...  # the API counts its refusals here

    @property
    def upgrades(self) -> Mapping[str, int]: ...  # upgrades by result (ok, failed)

    @property
    def last_upgrade(self) -> Mapping[str, Any] | None: ...  # the one this process came from

    @property
    def pair(self) -> Pair | None: ...  # an HA pair's part (runtime/pair.py)

    def in_flight(self) -> Mapping[tuple[str, str], list[int]]: ...

    def flows_by_backend(self) -> Mapping[tuple[str, str], int]: ...

    def flows_by_entry(self) -> Mapping[int, int]: ...

    def sample(self) -> dict[str, Any]: ...

    async def reload_from_file(self) -> list[str]: ...

    async def upgrade(self) -> str: ...
