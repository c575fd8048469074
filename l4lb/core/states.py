"""A group's backends and their states: health verdicts, operator states and weights, the
quorum, slow start, and the `Event`s each change emits; and the choices among them that read no
route (the scheduler's pick, the consistent hash, another instance's pin). The base of
`routing.Router`, which adds the routing decision; pure, no I/O, the clock injected."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection

from .backends import Backend, State
from .health import Event, Quorum
from .schedulers import Scheduler, make_scheduler, rendezvous
from .spec import GroupSpec


def checked_of(spec: GroupSpec) -> frozenset[str]:
    """The backends with an active health check of their own or the group's."""
    return frozenset(
        b.name for b in spec.backends if (b.health_check or spec.health_check) is not None
    )


class GroupState:
    """The backends of one group and everything that changes their state."""

    def __init__(
        self, spec: GroupSpec, clock: Callable[[], float], rng: random.Random | None
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.clock = clock
        self.wall = time.time
        self.backends = [Backend(b, i) for i, b in enumerate(spec.backends)]
        for b in self.backends:
            b.changed_at = self.wall()
        self.by_name = {b.name: b for b in self.backends}
        self.sorry = Backend(spec.sorry_server) if spec.sorry_server is not None else None
        self.scheduler: Scheduler = make_scheduler(spec.scheduler, self.primaries(), rng)
        self.backups = [b for b in self.backends if b.backup]
        self.quorum = Quorum(spec.quorum, spec.hysteresis, self.up_count())
        self.ramping: list[Backend] = []  # backends in their slow start
        self.listener: Callable[[Event], None] | None = None
        # Told of every health verdict that changes a backend (workers: the one that checks
        # tells the others through the supervisor).
        self.health_hook: Callable[[Backend, bool, str], None] | None = None
        # Backends with an active health check of their own or the group's (`vouched`).
        self.checked = checked_of(spec)

    def primaries(self) -> list[Backend]:
        return [b for b in self.backends if not b.backup]

    def all_backends(self) -> list[Backend]:
        return [*self.backends, self.sorry] if self.sorry is not None else list(self.backends)

    def up_count(self) -> int:
        """Backends that can take new clients, fullness aside (what the quorum counts)."""
        return sum(
            1
            for b in self.backends
            if b.healthy and b.admin is State.UP and b.weight > 0 and not b.removed
        )

    # ------------------------------------------------------------------ choosing among them

    def pick(self, key: int, exclude: Collection[Backend] = ()) -> Backend | None:
        """A new client's backend: the scheduler's among the backends that are not backups;
        when none of them can take it, the first backup that can, in the listed order (as
        HAProxy uses its first backup)."""
        choice = self.scheduler.pick(key, exclude)
        if choice is None:
            for b in self.backups:
                if b.schedulable and b not in exclude:
                    return b
        return choice

    def consistent(self, key: int) -> Backend | None:
        """The backend every instance picks for `key` without the shared table: the group's
        own scheduler when it is a consistent hash (sh, mh), else rendezvous hashing over the
        backends that take new clients."""
        if self.spec.scheduler in ("sh", "mh"):
            return self.pick(key)
        return rendezvous(key, [b for b in self.backends if b.schedulable and not b.backup]) or (
            self.pick(key)
        )

    def usable_pin(self, name: str) -> Backend | None:
        """The backend another instance pinned a client to, if this one may send it there."""
        b = self.by_name.get(name)
        return b if b is not None and b.accepts_pinned and not b.full else None

    def vouched(self, backend: Backend) -> bool:
        """Whether l4lb's own active check (from its own address) finds `backend` up: then a
        dial from another source that goes unanswered is that source's way back failing,
        not the backend (`source: client`)."""
        return backend.healthy and backend.name in self.checked

    # ------------------------------------------------------------------ slow start

    def slow_start_of(self, backend: Backend) -> float:
        return backend.slow_start if backend.slow_start is not None else self.spec.slow_start

    def ramp(self) -> None:
        """Move the effective weights of ramping backends on (the new clients' pick reads them,
        so it calls this, only while a backend ramps; so does a scrape)."""
        now = self.clock()
        self.ramping = [b for b in self.ramping if b.ramp(now, self.slow_start_of(b))]

    def _begin_ramp(self, backend: Backend) -> None:
        """A backend came (back) up: it takes new clients at 10% of its weight, ramping to all
        of it over its slow_start, so that wlc does not send it every new client at once."""
        backend.ramp_since = self.clock()
        backend.ramp(backend.ramp_since, self.slow_start_of(backend))
        if backend not in self.ramping:
            self.ramping.append(backend)

    # ------------------------------------------------------------------ state changes

    def set_health(self, backend: Backend, healthy: bool, reason: str) -> None:
        if backend.healthy == healthy:
            return
        self._change(backend, lambda: backend.set_healthy(healthy), reason)
        if self.health_hook is not None:
            self.health_hook(backend, healthy, reason)

    def set_admin(self, backend: Backend, state: State, reason: str = "operator") -> None:
        self._change(backend, lambda: backend.set_admin(state), reason)

    def set_weight(self, backend: Backend, weight: int, reason: str = "operator") -> None:
        def apply() -> None:
            backend.set_weight(weight)
            self.scheduler.rebuild()

        was = backend.weight
        self._change(backend, apply, reason)
        if weight != was:  # an event too, for the log and the status page
            self.emit(backend.name, f"weight {was}", f"weight {weight}", reason)

    def _change(self, backend: Backend, apply: Callable[[], None], reason: str) -> None:
        old = backend.state
        apply()
        if backend.state is not old:
            backend.note_state(self.wall())
            self.emit(backend.name, old.value, backend.state.value, reason)
            if backend.state is State.UP and self.slow_start_of(backend) > 0:
                self._begin_ramp(backend)
        lost = self.quorum.update(self.up_count())
        if lost is not None and self.sorry is not None:
            why = f"{self.up_count()} backends up, quorum {self.spec.quorum}"
            if lost:
                self.emit(None, "standby", "serving", why)
            else:
                self.emit(None, "serving", "standby", why)

    def emit(self, backend: str | None, old: str, new: str, reason: str) -> None:
        if self.listener is not None:
            self.listener(Event(self.wall(), self.name, backend, old, new, reason))
