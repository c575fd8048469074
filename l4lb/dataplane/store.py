"""A shared affinity table in Redis (or Valkey): a client pinned by one instance is found by all.

Theory of operation
-------------------
The local table (affinity.py) stays the first word: a client it knows is routed without Redis.
Redis is asked only when a pin is made: the first connection of a key this process has no
entry for, and a re-pin. It takes one round trip, a short script (CLAIM) that sets the key to
the candidate (the group scheduler's pick) with the persistence timeout as TTL unless Redis
already holds another pin for it, which it returns instead. Nil means nobody had the client:
the candidate is now the pin, for everyone. A name means another instance (or an earlier life
of this one) pinned it: the connection goes there if that backend may take pinned clients here,
and the pin is cached locally; if not, the new pin overwrites it at the next flush.

A re-pin (the pinned backend is down here) is claimed the same way, as a compare-and-set: the
script sets the new pin only if Redis still holds the dead one, so when several instances see
a backend fail at once, the first one's choice is everyone's.

Redis never holds a connection longer than `budget`. A lookup that fails or runs out of time
turns the store *down*: that connection, and every new pin until Redis answers again, goes to
the consistent hash (the group's scheduler if it is sh or mh, else rendezvous over the backends
that take new clients), which every instance computes alike, so instances cut off from Redis
still agree on new clients. A prober pings every `retry_interval`; when Redis answers, the
store reconciles: each local pin is written with SET NX GET, and where Redis already holds
another (written by an instance that got there first, or kept through the outage), that one
is taken locally, so the instances agree again; then the store is up.

The TTL in Redis is the persistence timeout, renewed by the flusher, which runs once a second
and writes (SET PX, pipelined) the pins that moved, the entries that a new connection made
active, and those whose last connection closed since the previous round; every `timeout / 3` it
also renews every entry with open connections (the instance's lease), so an entry cannot lapse
in Redis while a client is connected here. Each round also checks a key of the process's own
(`<prefix>instance:<random>`): a Redis that answers without it has restarted empty, and gets
every local pin back, as after an outage. So an outage is noticed within a round even with no
new client to notice it.
Last writer wins: the instance that served a client most recently holds its pin.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..core.backends import Backend
from ..core.route import Route
from ..core.routing import Router
from ..core.spec import StoreSpec
from ..core.throttle import Throttle, held_note
from . import walk

log = logging.getLogger("l4lb.store")
CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return false
end
return cur
"""
FLUSH_INTERVAL = 1.0
PIPELINE = 1000  # commands in one round trip
MAX_LEASE = 30.0
MARKER_TTL = 60  # seconds; renewed every round, so it outlives only a process that died
MAX_PIN = 256  # bytes: a backend's name (a name and an address, for a DNS name's addresses)


class BadAnswer(ValueError):
    """Redis answered something no command of ours can get: a store failure, never a client's."""


def pin_of(reply: object) -> str | None:
    """The backend name a claim or a SET GET answered (None: nobody held the client); raises
    BadAnswer for anything else (the wrong type, too long, not UTF-8)."""
    if reply is None:
        return None
    if not isinstance(reply, bytes) or not 0 < len(reply) <= MAX_PIN:
        shown = reply[:40] if isinstance(reply, bytes) else reply
        raise BadAnswer(f"a pin of the wrong shape: {type(reply).__name__} {shown!r}")
    try:
        return reply.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAnswer("a pin that is not UTF-8") from None


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class StoreStats:
    __slots__ = (
        "errors",
        "fallbacks",
        "found",
        "outages",
        "reconciled",
        "stale",
        "stored",
        "writes",
    )

    def __init__(self) -> None:
        self.found = 0  # fresh pins another instance had made
        self.stored = 0  # fresh pins this instance made for everyone
        self.stale = 0  # found pins to a backend that may not take them here
        self.fallbacks = 0  # fresh pins made by the consistent hash (Redis slow or down)
        self.errors = 0  # failed or timed-out Redis calls
        self.outages = 0
        self.writes = 0  # pins written by the flusher
        self.reconciled = 0  # pins written back when Redis returned


class RedisStore:
    def __init__(
        self,
        spec: StoreSpec,
        routers: Callable[[], dict[str, Router]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.asyncio import Redis  # imported only when a store is configured

        from .resp import BoundedParser

        self.spec = spec
        self.routers = routers
        self.clock = clock
        self.up = False
        self.stats = StoreStats()
        self._throttle = Throttle()
        self.client: Any
        if spec.cluster:
            from redis.asyncio.cluster import RedisCluster

            # (RedisCluster takes no parser: its replies are checked, not bounded as read)
            self.client = RedisCluster.from_url(spec.url, socket_connect_timeout=0.5, protocol=2)
        else:
            self.client = Redis.from_url(
                spec.url,
                socket_connect_timeout=0.5,
                socket_timeout=1.0,
                max_connections=64,
                protocol=2,  # RESP2, as every Redis and Valkey speaks it, read by a bounded parser
                parser_class=BoundedParser,
            )
        # One round trip claims a pin: set it if nobody holds the client or if it still holds
        # the pin being replaced (a dead backend's); else answer what it holds.
        self._claim = self.client.register_script(CLAIM)
        self._tasks: list[asyncio.Task[None]] = []
        self._flushed_at = clock()
        self._leased_at = clock()
        self._probing: asyncio.Task[None] | None = None
        # A key of this process's own: when Redis no longer has it, Redis lost its data.
        self.marker = f"{spec.key_prefix}instance:{uuid.uuid4().hex}"
        # (group, key) -> done, for pins being settled right now
        self.pending: dict[tuple[str, int], asyncio.Future[None]] = {}
        self.late_claims: set[asyncio.Future[Any]] = set()  # claims that ran out of their budget

    @property
    def where(self) -> str:
        """The URL without its password, for the logs."""
        return redact(self.spec.url)

    def key(self, router: Router, key: int) -> str:
        return f"{self.spec.key_prefix}{router.name}:{key:x}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Never blocks start-up on Redis: an unreachable store starts down and is probed."""
        self.routers_changed()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._flush_forever()))
        try:
            async with asyncio.timeout(max(self.spec.budget, 0.5)):
                await self._mark()
        except Exception as exc:
            self._down(f"not reachable at start: {exc}" if str(exc) else "not reachable at start")
        else:
            self.up = True
            log.info("affinity store %s: connected", self.where)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._probing is not None:
            self._probing.cancel()
        if self.up:
            try:
                async with asyncio.timeout(1.0):
                    await self._flush()
                    await self.client.delete(self.marker)
            except Exception:  # best effort on the way out
                pass
        await self.client.aclose()

    def routers_changed(self) -> None:
        """What this store hears of: moved pins and released entries (a new table too)."""
        for router in self.routers().values():
            if router.repinned is None:
                router.repinned = []
            if router.table is not None and router.table.released is None:
                router.table.released = []

    # ------------------------------------------------------------------ the fresh pin

    async def settle(self, router: Router, route: Route, candidate: Backend) -> Backend:
        """The backend a new pin goes to: the shared table's, or the candidate (now shared),
        or, with Redis slow or down, the consistent hash's."""
        router.settling(route)
        table = router.table
        if table is None:
            return candidate
        where = (router.name, route.key)
        if where in self.pending:  # another connection of the client is settling it
            return await self.follow(router, route, candidate)
        done = asyncio.get_running_loop().create_future()
        self.pending[where] = done
        try:
            return await self._settle(router, route, candidate, table.timeout)
        finally:
            del self.pending[where]
            done.set_result(None)

    async def follow(self, router: Router, route: Route, backend: Backend) -> Backend:
        """A connection of a client whose pin is being settled waits for the outcome (a
        browser opens several at once), so that all of them reach one backend."""
        done = self.pending.get((router.name, route.key))
        if done is not None:
            await asyncio.shield(done)
        entry = route.entry
        settled = entry.backend if entry is not None else None
        if settled is not None and settled is not backend and settled.accepts_pinned:
            router.swap(route, settled, follows=True)
            return settled
        return backend

    async def _settle(
        self, router: Router, route: Route, candidate: Backend, ttl: float
    ) -> Backend:
        if self.up:
            claim = asyncio.ensure_future(
                self._claim(
                    keys=[self.key(router, route.key)],
                    args=[candidate.name, route.shared, int(ttl * 1000)],
                )
            )
            try:
                async with asyncio.timeout(self.spec.budget):
                    name = pin_of(await asyncio.shield(claim))
            except Exception as exc:  # whatever Redis did or said, the client goes on
                self._failed(exc)
                if not claim.done():  # it may still be applied: hear how it ended
                    self.late_claims.add(claim)
                    claim.add_done_callback(
                        lambda c, key=route.key: self._claimed_late(c, router, key, candidate)
                    )
            else:
                if name is None:
                    self.stats.stored += 1
                    router.shared_as(route, candidate.name)
                    return candidate
                found = router.usable_pin(name)
                if found is None:  # pinned where this process cannot send it: ours wins
                    self.stats.stale += 1
                    if router.repinned is not None:
                        router.repinned.append(route.key)
                    return candidate
                self.stats.found += 1
                router.shared_as(route, name)
                router.swap(route, found)
                return found
        self.stats.fallbacks += 1
        chosen = router.consistent(route.key)
        if chosen is None or route.backend is None:
            return candidate
        router.swap(route, chosen)
        return chosen

    def _claimed_late(
        self, claim: asyncio.Future[Any], router: Router, key: int, candidate: Backend
    ) -> None:
        """A claim that ran out of its budget was answered after all. Redis then holds our
        candidate (nil) or another instance's pin, while this connection went to the
        consistent hash: the local entry takes what Redis holds, as the reconcile would, so
        that the next connection already agrees with the other instances."""
        self.late_claims.discard(claim)
        if claim.cancelled() or claim.exception() is not None:
            return
        table = router.table
        entry = table.get(key) if table is not None else None
        if table is None or entry is None or entry.backend is None:
            return
        try:
            old = pin_of(claim.result())
        except BadAnswer:
            return  # (its own failure was counted when the budget ran out)
        held = router.usable_pin(candidate.name if old is None else old)
        if held is not None:
            table.repin(key, held)  # open connections stay; new ones go there

    # ------------------------------------------------------------------ health of the store

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self._down(type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or repr(exc))

    def _down(self, why: str) -> None:
        if self.up or self.stats.outages == 0:
            self.stats.outages += 1
            held = self._throttle.allow("down")
            if held is not None:
                log.warning(
                    "affinity store %s unavailable (%s): new clients go to the consistent hash"
                    " until it answers%s",
                    self.where,
                    "timed out" if why == "TimeoutError" else why,
                    held_note(held),
                )
        self.up = False
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe())

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self.spec.budget, 0.5)):
                await self.client.ping()
            return True
        except Exception:
            return False

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.spec.retry_interval)
            if not await self._ping():
                continue
            try:
                written, adopted = await self._reconcile()
                async with asyncio.timeout(max(self.spec.budget, 0.5)):
                    await self._mark()
            except Exception:  # down again: go on probing
                continue
            self.stats.reconciled += written
            self._flushed_at = self.clock()
            self.up = True
            log.info(
                "affinity store %s is back: wrote %d local pins to it, took %d from it",
                self.where,
                written,
                adopted,
            )
            return

    async def _reconcile(self) -> tuple[int, int]:
        """Write every local pin that Redis lacks; where Redis has another (an instance that
        got there first), take it, so that all instances agree again. Returns both counts."""
        written = adopted = 0
        for router in list(self.routers().values()):
            table = router.table
            if table is None:
                continue
            async for chunk in walk.pins(table):  # (in slices: the relay goes on meanwhile)
                for i in range(0, len(chunk), PIPELINE):
                    batch = chunk[i : i + PIPELINE]
                    async with asyncio.timeout(5.0):
                        async with self.client.pipeline(transaction=False) as pipe:
                            for key, backend, left in batch:
                                pipe.set(
                                    self.key(router, key),
                                    backend.name,
                                    nx=True,
                                    get=True,
                                    px=max(1, int(left * 1000)),
                                )
                            results = await pipe.execute()
                    for (key, backend, _left), old in zip(batch, results, strict=True):
                        theirs = pin_of(old)
                        if theirs is None:
                            written += 1
                            continue
                        found = router.usable_pin(theirs) if theirs != backend.name else None
                        if found is not None and table.repin(key, found):
                            adopted += 1  # open connections stay; new ones go there
        return written, adopted

    # ------------------------------------------------------------------ writing pins

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if not self.up:
                for router in self.routers().values():
                    if router.repinned:
                        router.repinned.clear()  # the reconcile writes everything
                    if router.table is not None and router.table.released:
                        router.table.released.clear()
                continue
            try:
                await self._flush()
                async with asyncio.timeout(max(self.spec.budget, 0.5)):
                    present = await self.client.expire(self.marker, MARKER_TTL)  # 0: gone
                if not present:
                    await self._relearn()
            except Exception as exc:
                self._failed(exc)

    async def _mark(self) -> None:
        await self.client.set(self.marker, "1", ex=MARKER_TTL)

    async def _relearn(self) -> None:
        """Redis answers but lost our marker: it restarted empty (or was flushed) between two
        rounds, so our pins are gone from it: write them back, as after an outage."""
        written, adopted = await self._reconcile()
        await self._mark()
        self.stats.outages += 1
        self.stats.reconciled += written
        log.warning(
            "affinity store %s lost its data (restarted empty?): wrote %d local pins back,"
            " took %d from it",
            self.where,
            written,
            adopted,
        )

    async def _flush(self) -> None:
        now = self.clock()
        since, self._flushed_at = self._flushed_at, now
        lease = False
        for router in self.routers().values():
            if router.table is not None and now - self._leased_at >= min(
                MAX_LEASE, router.table.timeout / 3
            ):
                lease = True
        if lease:
            self._leased_at = now
        self.stats.writes += await self._write(self._touched(since, lease))

    def _touched(self, since: float, lease: bool) -> Iterator[tuple[str, str, int]]:
        """(key, backend, ms to live) of pins that moved, were released since `since`, or,
        with `lease`, have open connections."""
        for router in self.routers().values():
            table = router.table
            moved, router.repinned = router.repinned or [], []
            if table is None:
                continue
            ttl = int(table.timeout * 1000)
            for key in moved:
                entry = table.get(key)
                if entry is not None and entry.backend is not None:
                    yield self.key(router, key), entry.backend.name, ttl
            for entry in table.activated_since(since):  # a new connection renews the TTL
                if entry.backend is not None:
                    yield self.key(router, entry.key), entry.backend.name, ttl
            for key in table.take_released():  # the last connection closed: a new TTL
                entry = table.get(key)
                if entry is not None and entry.backend is not None and not entry.refs:
                    left = int((entry.expires - self.clock()) * 1000)
                    if left > 0:
                        yield self.key(router, key), entry.backend.name, left
            if lease:
                for entry in table.active():
                    if entry.backend is not None:
                        yield self.key(router, entry.key), entry.backend.name, ttl

    async def _write(self, pins: Iterator[tuple[str, str, int]]) -> int:
        n = 0
        batch: list[tuple[str, str, int]] = []
        for pin in pins:
            batch.append(pin)
            if len(batch) >= PIPELINE:
                n += await self._send(batch)
                batch = []
        if batch:
            n += await self._send(batch)
        return n

    async def _send(self, batch: list[tuple[str, str, int]]) -> int:
        async with asyncio.timeout(5.0):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, name, ms in batch:
                    pipe.set(key, name, px=ms)
                await pipe.execute()
        return len(batch)
