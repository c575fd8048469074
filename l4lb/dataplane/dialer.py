"""Dialing a backend: a TCP connection's connect step (`Dial`, which `path.connect` runs for
each backend it tries), the shared sweep of the dials' deadlines (`Deadlines`), the runner that
steps a dial without a Task (`Stepper`), and the bounded queue in which a pinned client whose
backend is full may wait for a free slot (`SlotQueue`, `queue_timeout`)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from ..core.backends import Backend
from .transparent import connect as from_source

if TYPE_CHECKING:
    pass

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


class Step:
    """A transport's connect step, as `path.connect` runs it: one attempt at `backend` on `port`,
    awaited; it raises OSError or `SourceError`. `timeout`: its deadline in seconds (0: it
    cannot stall); `made`: what the attempt that succeeded made (a flow's socket). A base class,
    not a Protocol, so that the compiled loop calls it directly."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.made: object = None

    def attempt(self, backend: Backend, port: int) -> Awaitable[object]:
        raise NotImplementedError


class Dial(Step):
    """A TCP connection's connect step: one dial of a backend, from the group's `source` when it
    has one. Its deadline (`timeout`, the group's connect_timeout) is kept by `path.connect` with
    the shared sweep (`Deadlines`). Its protocol factory (`backend_side`) makes the backend
    side, `make(client)`, which registers itself with its client
    (`relay.BackendSide.connection_made`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        make: Callable[[Any], object],
        client: object,
        *,
        timeout: float,
        source: str | None,
        transparent: bool,
    ) -> None:
        super().__init__(timeout)
        self.loop = loop
        self.make = make
        self.client = client
        self.source = source  # the address to dial from (`transparent`: the client's own)
        self.transparent = transparent

    def backend_side(self) -> object:
        """The protocol factory of the dial (compiled, a native class's `__call__` is not one)."""
        return self.make(self.client)

    def attempt(self, backend: Backend, port: int) -> Awaitable[object]:
        """The dial of `backend` on `port` (no coroutine of its own: the loop's is awaited)."""
        if self.source is None:
            return self.loop.create_connection(as_factory(self.backend_side), backend.address, port)
        return from_source(
            self.loop,
            as_factory(self.backend_side),
            backend.address,
            port,
            self.source,
            self.transparent,
        )
