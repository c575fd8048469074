"""The health monitor: runs each backend's active check on its interval, feeds the verdicts to
the router, and acts on every state change (log line, history, notify command, closing the
connections of a backend that went down when the group says `on_down: close`).

A backend marked down by the passive check in a group without an active check is probed with a
plain TCP connect every 2 s until it passes twice, so that it can come back.

With workers, one worker checks (the leader) and the others follow: a follower runs no active
check and no notify command; the leader's verdicts reach it through the supervisor (`apply`),
so a backend is probed once per interval whatever the number of workers, and a state change
notifies once. A follower still acts on its own passive failures (and probes those back up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..core.backends import Backend, State
from ..core.health import Event, Verdict
from ..core.histogram import Histogram
from ..core.routing import Router
from ..core.spec import HealthCheckSpec
from .probes import probe

log = logging.getLogger("l4lb.health")
RECENT_CHECKS = 60  # check results kept per backend for the status page
CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RECOVERY_CHECK = HealthCheckSpec(type="tcp", interval=2.0, timeout=1.0, rise=2, fall=1)
NOTIFY_TIMEOUT = 30.0
MAX_NOTIFY = 16  # notify commands running at once; more are skipped, and logged


@dataclass(slots=True)
class CheckResult:
    ok: bool
    detail: str
    duration: float
    time: float  # wall clock


class HealthMonitor:
    def __init__(
        self,
        routers: Mapping[str, Router],
        close_connections: Callable[[Router, Backend], int],
        rng: random.Random | None = None,
        follower: bool = False,
    ) -> None:
        self.routers = routers
        self.follower = follower
        self._relaying = False  # applying the leader's verdict: not ours to probe back up
        self.close_connections = close_connections
        self.rng = rng or random.Random()
        self.events: deque[Event] = deque(maxlen=1000)
        self.results: dict[tuple[str, str], CheckResult] = {}  # the last result of each check
        self.counts: dict[tuple[str, str], list[int]] = {}  # [passed, failed], ever
        self.durations: dict[tuple[str, str], Histogram] = {}  # of every check, ever
        self.recent: dict[tuple[str, str], deque[CheckResult]] = {}  # the last ones, for the page
        self._checks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._notifies: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []

    def start(self) -> None:
        for router in self.routers.values():
            router.listener = self.on_event
            if self.follower:
                continue
            for spec, backend in zip(router.spec.backends, router.backends, strict=True):
                check = spec.health_check or router.spec.health_check
                if check is not None and not backend.unresolved:  # nothing to probe yet
                    self._start(router, backend, check, until_up=False)

    async def restart(self) -> None:
        """After a reload: the checks of the new configuration, with verdicts kept."""
        checks = list(self._checks.values())
        for t in checks:
            t.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        self._checks.clear()
        self.start()

    async def stop(self) -> None:
        tasks = [*self._checks.values(), *self._notifies]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._checks.clear()

    def _start(
        self, router: Router, backend: Backend, check: HealthCheckSpec, until_up: bool
    ) -> None:
        key = (router.name, backend.name)
        task = asyncio.get_running_loop().create_task(self._run(router, backend, check, until_up))
        self._checks[key] = task
        task.add_done_callback(
            lambda t: self._checks.pop(key, None) if self._checks.get(key) is t else None
        )

    async def _run(
        self, router: Router, backend: Backend, check: HealthCheckSpec, until_up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        if check.type == "udp":
            port = backend.udp_port_for(check.port or router.spec.udp_ports[0])
        else:  # a group's TCP check covers its UDP ports too (the same port numbers over TCP)
            port = backend.port_for(check.port or router.spec.first_port)
        verdict = Verdict(check.rise, check.fall, backend.healthy)
        if not until_up:  # spread the first checks so that they do not fire in lockstep
            await asyncio.sleep(self.rng.uniform(0, check.interval))
        while True:
            t0 = loop.time()
            ok, detail = await probe(check, backend.address, port, backend.name, backend.hostname)
            key = (router.name, backend.name)
            took = loop.time() - t0
            self.results[key] = CheckResult(ok, detail, took, time.time())
            self.counts.setdefault(key, [0, 0])[0 if ok else 1] += 1
            self.durations.setdefault(key, Histogram(CHECK_BUCKETS)).observe(took)
            self.recent.setdefault(key, deque(maxlen=RECENT_CHECKS)).append(self.results[key])
            if verdict.healthy != backend.healthy:  # the passive check or an operator moved it
                verdict.force(backend.healthy)
            change = verdict.record(ok)
            if change is not None:
                n = check.rise if change else check.fall
                router.set_health(
                    backend,
                    change,
                    f"{check.type} check {'passed' if change else 'failed'} {n}x: {detail}",
                )
            if until_up and backend.healthy:
                return
            await asyncio.sleep(check.interval * self.rng.uniform(0.9, 1.1))

    def apply(self, group: str, backend: str, healthy: bool, reason: str) -> None:
        """A follower takes the leader's verdict."""
        router = self.routers.get(group)
        b = router.by_name.get(backend) if router is not None else None
        if router is None or b is None:
            return  # a reload the leader has applied and we have not yet, or the reverse
        self._relaying = True
        try:
            router.set_health(b, healthy, reason)
        finally:
            self._relaying = False

    async def wait_event(self, match: Callable[[Event], bool]) -> Event:
        """The next event for which `match` is true."""
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        waiter = (match, fut)
        self._waiters.append(waiter)
        try:
            return await fut
        finally:
            self._waiters.remove(waiter)

    async def notified(self) -> None:
        """Until every notify command started so far has finished."""
        await asyncio.gather(*self._notifies, return_exceptions=True)

    def note_reload(self, changes: list[str], now: float) -> None:
        """A reload's changes, in the events the API and the status page show (the reload's
        own log line says them already): one event each, the group's when it names one, with
        `old` "configuration", `new` the change and `reason` "reload"."""
        for change in changes:
            group, sep, rest = change.partition(": ")
            if sep and group.startswith("group "):
                name, text = group.removeprefix("group "), rest
            else:
                name, text = "", change
            self.events.append(Event(now, name, None, "configuration", text, "reload"))

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        for match, fut in self._waiters:
            if not fut.done() and match(event):
                fut.set_result(event)
        bad = event.new in (State.DOWN, State.DISABLED, "serving")
        log.log(logging.WARNING if bad else logging.INFO, "%s", event.describe())
        router = self.routers.get(event.group)
        if router is not None and event.backend is not None:
            backend = router.by_name.get(event.backend)
            if backend is not None:
                self._act(router, backend, event)
        if router is not None and router.spec.notify and not self.follower:
            self._notify(router.spec.notify, event)

    def _act(self, router: Router, backend: Backend, event: Event) -> None:
        if (
            event.new == State.DOWN
            and (router.name, backend.name) not in self._checks
            and not self._relaying
        ):
            self._start(router, backend, RECOVERY_CHECK, until_up=True)
        if (
            event.new in (State.DOWN, State.DISABLED)
            and router.spec.on_down == "close"
            and not backend.inhibit
        ):
            n = self.close_connections(router, backend)
            if n:
                log.info(
                    "group %s: closed %d connections of backend %s (on_down: close)",
                    router.name,
                    n,
                    backend.name,
                )

    def _notify(self, argv: tuple[str, ...], event: Event) -> None:
        if len(self._notifies) >= MAX_NOTIFY:
            log.warning(
                "notify: %d commands still running; not running one for: %s",
                MAX_NOTIFY,
                event.describe(),
            )
            return
        task = asyncio.get_running_loop().create_task(self._run_notify(argv, event))
        self._notifies.add(task)
        task.add_done_callback(self._notifies.discard)

    async def _run_notify(self, argv: tuple[str, ...], event: Event) -> None:
        env = dict(
            os.environ,
            L4LB_GROUP=event.group,
            L4LB_BACKEND=event.backend or "",
            L4LB_OLD_STATE=event.old,
            L4LB_STATE=event.new,
            L4LB_REASON=event.reason,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("notify: cannot run %s: %s", argv[0], exc.strerror or exc)
            return
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                code = await proc.wait()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its group is ours
            await proc.wait()
            log.warning("notify: %s took over %gs and was killed", argv[0], NOTIFY_TIMEOUT)
            return
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if code != 0:
            log.warning("notify: %s exited with status %d", argv[0], code)
