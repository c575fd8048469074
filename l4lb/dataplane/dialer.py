"""Dialing a backend for one client: the pinned or scheduled backend first, the next on refusal
or timeout, until one accepts or the router has none left. A pinned client whose backend is full
may wait in a bounded queue for a free slot (`queue_timeout`)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from ..core.backends import Backend
from ..core.routing import Route, Router
from ..core.throttle import Throttle, held_note
from .transparent import SourceError
from .transparent import connect as from_source

if TYPE_CHECKING:
    from .store import RedisStore

log = logging.getLogger("l4lb.dialer")
P = TypeVar("P")  # a protocol: the relay's are native classes, not asyncio.Protocol's


def as_factory(factory: Callable[[], object]) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory as asyncio's types want it. uvloop duck-types a protocol (it asks only
    whether it is an asyncio.Protocol and whether it has `get_buffer`), so the relay's protocols
    need not subclass asyncio.Protocol, which would keep them out of mypyc's native classes."""
    return cast("Callable[[], asyncio.BaseProtocol]", factory)


# Errors of socket(), connect() and accept() that say this process (or the system) is out of
# something, not that a backend failed.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class SlotQueue:
    """Pinned clients waiting for a slot on a full backend, first come first served. A backend's
    queue holds at most `max_conns` clients; beyond that a client is rescheduled at once."""

    def __init__(self) -> None:
        self._waiters: dict[Backend, deque[asyncio.Future[bool]]] = {}

    async def wait(self, backend: Backend, patience: float) -> bool:
        """True when a slot came free within `patience` seconds."""
        if backend.waiting >= max(backend.max_conns, 1):
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        queue = self._waiters.setdefault(backend, deque())
        queue.append(fut)
        backend.waiting += 1
        # A timer, not `asyncio.timeout`: that needs a Task, and a dial may run without one
        # (`Stepper`).
        timer = loop.call_later(patience, _lapse, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            backend.waiting -= 1
            if not fut.done():
                fut.cancel()
            with_queue = self._waiters.get(backend)
            if with_queue is not None and fut in with_queue:
                with_queue.remove(fut)

    def wake(self, backend: Backend) -> None:
        """A slot came free on `backend`: the longest waiter may take it."""
        queue = self._waiters.get(backend)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(True)
                return


def _lapse(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Cancellable(Protocol):
    """What a dial's deadline needs of what runs it: an asyncio.Task, or a `Stepper`."""

    def cancel(self, msg: Any | None = None) -> bool: ...
    def uncancel(self) -> int: ...
    def done(self) -> bool: ...


class Stepper:
    """Runs a coroutine as a Task would, stepped from the done callbacks of the futures it
    awaits, without the Task: its allocation, its context copy and its first turn of the loop
    (measured on the bare relay: 100,131 instructions a connection with a Task, 88,485 so;
    bench/bare_relay.py, BARE_DIAL). What it does not give: `asyncio.current_task()` is not it,
    so the coroutine must not use `asyncio.timeout` (the store's calls do: a dial with a store
    runs in a Task). `cancel` cancels the awaited future, whose callback resumes the coroutine
    with CancelledError, as Task.cancel does; a coroutine that ends with an exception other
    than a cancel is logged."""

    __slots__ = ("_cancels", "_coro", "_finished", "_must_cancel", "_waiting")

    def __init__(self) -> None:
        self._coro: Coroutine[Any, Any, None] | None = None
        # Any, not a Future: uvloop's socket futures (sock_connect's) answer None to cancel(),
        # where a Future's types say bool, and compiled code checks the types it is told.
        self._waiting: Any = None
        self._finished = False
        self._cancels = 0
        self._must_cancel = False  # cancelled when its future had completed already

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` to its first await, now (a Task would wait for the next turn)."""
        self._coro = coro
        self._step()

    def _step(self, _: object = None) -> None:
        coro = self._coro
        assert coro is not None
        self._waiting = None
        try:
            if self._must_cancel:
                self._must_cancel = False
                fut = coro.throw(asyncio.CancelledError())
            else:
                fut = coro.send(None)
        except StopIteration:
            self._end()
            return
        except asyncio.CancelledError:
            self._end()
            return
        except Exception:
            log.exception("a dial ended with an error")
            self._end()
            return
        if fut is None:  # a bare yield: the next turn
            asyncio.get_running_loop().call_soon(self._step)
            return
        fut._asyncio_future_blocking = False
        self._waiting = fut
        fut.add_done_callback(self._step)

    def _end(self) -> None:
        self._finished = True
        self._coro = None  # (its frame and locals go now)

    def cancel(self, msg: Any | None = None) -> bool:
        if self._finished:
            return False
        self._cancels += 1
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
        if waiting is None or not waiting.cancelled():  # (done: its callback is on its way)
            self._must_cancel = True
        return True

    def uncancel(self) -> int:
        if self._cancels > 0:
            self._cancels -= 1
        return self._cancels

    def done(self) -> bool:
        return self._finished


class Deadlines:
    """The connect deadlines of the dials in flight, swept every `TICK` by one timer that runs
    only while a dial waits: a dict insert and delete per dial where a timer of its own would
    cost an allocation, a heap push and a cancel. A dial may so run up to `TICK` past its
    connect_timeout before it is cancelled."""

    TICK: ClassVar[float] = 0.05  # (a class attribute: compiled, a plain one is per instance)

    def __init__(self) -> None:
        self.waiting: dict[Cancellable, float] = {}
        self.expired: set[Cancellable] = set()  # cancelled by the sweep, not yet seen
        self._timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, task: Cancellable, at: float) -> None:
        self.waiting[task] = at
        if self._timer is None:
            self._timer = loop.call_later(self.TICK, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        waiting = self.waiting
        for task in [t for t, at in waiting.items() if at <= now]:
            del waiting[task]
            self.expired.add(task)
            task.cancel()
        self._timer = loop.call_later(self.TICK, self._sweep, loop) if waiting else None


class DialContext(Protocol):
    """The dial's share of the data plane's context (`context.DataPlane`)."""

    loop: asyncio.AbstractEventLoop
    slots: SlotQueue
    deadlines: Deadlines
    store: RedisStore | None


async def dial(
    router: Router,
    route: Route,
    service_port: int,
    factory: Callable[[], P],
    ctx: DialContext,
    *,
    task: Cancellable | None = None,
    connect_timeout: float | None = None,
    source: str | None = None,
    transparent: bool = False,
) -> tuple[Backend, int, float, str, P] | None:
    """Connect to a backend for `route`: the backend, the port dialed, the loop time the
    connection was made, what became of the client's pin (`Router.connected`), and the
    connection's protocol; None when every backend the router offers failed. A fresh pin is
    first settled with the shared store, when there is one. `task` (the one running this)
    saves looking it up; `connect_timeout` is the group's unless given; `source` the address
    to dial from (`transparent`: the client's own)."""
    loop = ctx.loop
    if task is None:
        task = asyncio.current_task()
    assert task is not None
    if connect_timeout is None:
        connect_timeout = router.spec.connect_timeout
    store = ctx.store
    while True:
        backend = router.next_backend(route)
        if backend is None:
            full = route.wait_for
            if full is None:
                return None
            route.queued = True
            await ctx.slots.wait(full, router.spec.queue_timeout)
            continue
        if store is not None and backend is not router.sorry:
            if route.fresh:
                backend = await store.settle(router, route, backend)
            elif store.pending:
                backend = await store.follow(router, route, backend)
        port = backend.port_for(service_port)
        t0 = loop.time()
        # The connect timeout: the shared sweep cancels this task at its deadline (cheaper than
        # `asyncio.timeout` or a timer per dial). A cancel it did not make is the client's leaving;
        # when it did, the cancellation count tells ours alone from ours and the client's.
        deadlines = ctx.deadlines
        deadlines.add(loop, task, t0 + connect_timeout)
        exc: OSError | None = None
        try:
            if source is None:
                _, made = await loop.create_connection(as_factory(factory), backend.address, port)
            else:
                made = await from_source(
                    loop, as_factory(factory), backend.address, port, source, transparent
                )
            protocol = cast(P, made)
        except asyncio.CancelledError:
            expired = deadlines.expired
            if task not in expired:
                raise
            expired.discard(task)
            if task.uncancel() != 0:
                raise
            exc = TimeoutError()  # ours alone: the backend did not answer in time
        except SourceError as error:
            _source_failed(router, route, backend, str(error))
            return None
        except OSError as error:
            exc = error
        finally:
            deadlines.waiting.pop(task, None)
        if exc is not None and transparent and _hosts_failure(router, route, backend, exc):
            return None
        if exc is not None:
            if not _failed(router, route, backend, port, exc, ctx.slots):
                return None
            continue
        now = loop.time()
        router.stats.connect.observe(now - t0)
        return backend, port, now, router.connected(route, backend), protocol


_throttle = Throttle()  # a line a second at most, however many dials fail alike


def _hosts_failure(router: Router, route: Route, backend: Backend, exc: OSError) -> bool:
    """A dial from the client's own address failed: whether it is this host's failure (counted
    as `source`, the backend not blamed; no other backend would do better)."""
    if not router.source_ready:
        # Unanswered for want of the way back on this host (said at start).
        _source_failed(router, route, backend, "the way back for the answers is missing")
        return True
    if isinstance(exc, TimeoutError) and router.vouched(backend):
        # Its answer never came, from a backend that l4lb's own check (from l4lb's own
        # address) finds up: the answer went the client's way, not back through this host (a
        # policy rule gone since the start, or a client network without the way back).
        _source_failed(
            router,
            route,
            backend,
            f"no answer from {backend.name}, which l4lb's own check finds up: the answers"
            " to this client do not come back through this host",
        )
        return True
    return False


def _source_failed(router: Router, route: Route, backend: Backend, why: str) -> None:
    router.source_failure(route, backend)
    held = _throttle.allow(("source", router.name))
    if held is not None:
        log.warning(
            "group %s: a dial from source %s failed: %s (counted as"
            ' l4lb_connections_failed_total{reason="source"}; see docs/deployment.md)%s',
            router.name,
            router.spec.source,
            why,
            held_note(held),
        )


def _failed(
    router: Router, route: Route, backend: Backend, port: int, exc: OSError, slots: SlotQueue
) -> bool:
    """A dial of `backend` failed with `exc`; whether another backend is worth a try."""
    if exc.errno in RESOURCE_ERRNOS:
        # This process is out of descriptors: not the backend's fault, so no passive
        # failure, and no other backend would do better.
        router.local_failure(route, backend, errno.errorcode[exc.errno])
        return False
    router.failed(route, backend, _reason(exc))
    log.debug(
        "group %s: backend %s (%s:%d) failed: %s",
        router.name,
        backend.name,
        backend.address,
        port,
        exc.strerror or type(exc).__name__,
    )
    if backend.waiting:
        slots.wake(backend)
    return True


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "refused" if isinstance(exc, ConnectionRefusedError) else "error"
