"""The balancer in the test's event loop, real backends and real clients on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

import pytest

from l4lb import Server
from l4lb.dataplane.relay import HIGH_WATER
from tests.support.helpers import (
    FakeClock,
    NamedBackend,
    config_of,
    free_ports,
    greet,
    group_yaml,
    hello,
    running,
    wait_until,
)


async def test_one_client_one_backend_across_ports_for_many_clients(backends) -> None:
    p80, p443 = free_ports(2)
    bs = await backends(3, [p80, p443])
    cfg = config_of(group_yaml("web", [p80, p443], [b.yaml() for b in bs], scheduler="wlc"))
    async with running(cfg) as server:
        seen: dict[str, str] = {}
        for i in range(60):
            src = f"127.0.{1 + i // 30}.{1 + i % 30}"
            names = {await hello(p80 if j % 2 == 0 else p443, src) for j in range(4)}
            assert len(names) == 1, (src, names)
            seen[src] = names.pop()
        counts = {b.name: list(seen.values()).count(b.name) for b in bs}
        assert all(c >= 10 for c in counts.values()), counts  # the scheduler spread the clients
        table = server.routers["web"].table
        assert table is not None and len(table) == 60 and table.misses == 60


async def test_netmask_groups_a_subnet(backends) -> None:
    p1, p2 = free_ports(2)
    bs = await backends(4, [p1])
    bs2 = await backends(4, [p2])
    cfg = config_of(
        group_yaml("by24", [p1], [b.yaml() for b in bs], netmask="/24"),
        group_yaml("by32", [p2], [b.yaml() for b in bs2], netmask="255.255.255.255"),
    )
    async with running(cfg):
        subnet = {await hello(p1, f"127.0.9.{i}") for i in range(1, 20)}
        assert len(subnet) == 1
        hosts = {await hello(p2, f"127.0.9.{i}") for i in range(1, 20)}
        assert len(hosts) == 4


async def test_idle_entry_expires_after_timeout_and_an_open_connection_holds_it(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    clock = FakeClock()
    cfg = config_of(group_yaml("web", [port], [b.yaml() for b in bs], timeout="30s"))
    async with running(cfg, clock=clock) as server:
        first = await hello(port, "127.0.0.5")
        clock.advance(29)
        assert await hello(port, "127.0.0.5") == first  # a new connection restarts the 30 s
        clock.advance(29)
        name, _r, w = await greet(port, "127.0.0.5")  # held open across the timeout
        assert name == first
        clock.advance(3600)
        assert await hello(port, "127.0.0.5") == first
        w.close()
        await w.wait_closed()
        await asyncio.wait_for(server.wait_quiet(), 5)
        clock.advance(30.1)
        # rr moves an expired client on to the other backend
        assert await hello(port, "127.0.0.5") != first


async def test_killed_pinned_backend_is_replaced_without_a_failed_connection(backends) -> None:
    p80, p443 = free_ports(2)
    bs = await backends(3, [p80, p443])
    cfg = config_of(group_yaml("web", [p80, p443], [b.yaml() for b in bs]))
    async with running(cfg) as server:
        first = await hello(p80, "127.0.3.3")
        victim = next(b for b in bs if b.name == first)
        await victim.stop()
        second = await hello(p443, "127.0.3.3")
        assert second != first
        assert await hello(p80, "127.0.3.3") == second
        stats = server.routers["web"].stats
        assert stats.repins == 1 and stats.no_backend == 0


def tarpit(cleanup) -> int:
    """A listener that never accepts: once its backlog is full, SYNs are dropped and connects
    time out. Its port."""
    sock = cleanup(socket.socket())
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    for _ in range(3):
        f = cleanup(socket.socket())
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(sock.getsockname())
    return sock.getsockname()[1]


async def test_connect_timeout_fails_over_to_the_next_backend(backends, cleanup) -> None:
    (port,) = free_ports(1)
    (good,) = await backends(1, [port], prefix="good")
    tport = tarpit(cleanup)
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [
                f"- {{name: tarpit, address: 127.0.0.1, weight: 10, ports: {{{port}: {tport}}}}}",
                good.yaml(),
            ],
            scheduler="fo",
            extra="connect_timeout: 200ms",
        ).replace("    connect_timeout: 1s\n", "")
    )
    async with running(cfg) as server:
        assert await hello(port) == good.name
        assert server.routers["web"].stats.connect_failures == 1


async def test_a_client_that_sends_while_its_dial_waits_is_held_at_the_high_water_mark(
    cleanup,
) -> None:
    """Issue 26: a client is not paused when accepted (no pause and resume per connection);
    what it sends before its backend is connected is buffered until the buffer passes the
    high-water mark, then its reading stops (`held`) until the pair is made. Every byte
    arrives, in order."""
    received = bytearray()
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(65536):
            received.extend(chunk)
        done.set()
        w.close()

    srv = cleanup(await asyncio.start_server(sink, "127.0.0.1", 0))
    sink_port = srv.sockets[0].getsockname()[1]
    tport = tarpit(cleanup)
    (port,) = free_ports(1)
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [
                f"- {{name: tarpit, address: 127.0.0.1, weight: 10, ports: {{{port}: {tport}}}}}",
                f"- {{name: sink, address: 127.0.0.1, ports: {{{port}: {sink_port}}}}}",
            ],
            scheduler="fo",
            extra="connect_timeout: 1s",
        ).replace("    connect_timeout: 1s\n", "", 1)
    )
    async with running(cfg) as server:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(8 << 20)
        w.write(payload)  # more than l4lb's buffer and the kernel's together
        await wait_until(lambda: any(c.held for c in server.plane.live))
        (conn,) = server.plane.live
        assert conn.peer is None  # still dialing the tarpit
        assert sum(map(len, conn.pending or [])) <= HIGH_WATER + 256 * 1024
        await w.drain()  # flows once the dial fails over to the sink
        w.write_eof()
        await asyncio.wait_for(done.wait(), 20)
        assert received == payload
        w.close()


async def test_the_dials_deadline_against_a_cancel_of_its_own_task(cleanup) -> None:
    """A dial times out through the shared deadline sweep (`dialer.Deadlines`): a timeout is a
    failure of the backend; a cancel from outside (the client left) stays a cancel, also when
    the deadline passed in the same turn of the loop."""
    from l4lb.config import load_config_text
    from l4lb.core.connection import Conn
    from l4lb.core.routing import Router
    from l4lb.dataplane.context import DataPlane
    from l4lb.dataplane.dialer import Deadlines, Dial
    from l4lb.dataplane.path import NO_BACKEND, connect, open_route

    port = tarpit(cleanup)
    loop = asyncio.get_running_loop()
    spec = load_config_text(
        "groups: {g: {ports: [80], backends: [{name: t, address: 127.0.0.1,"
        f" ports: {{80: {port}}}}}]}}}}"
    ).groups[0]
    deadlines = Deadlines()

    def start(within: float) -> tuple[Router, asyncio.Task[str]]:
        """A dial with a sweep of its own, so that the timing of one case is not another's."""
        nonlocal deadlines
        deadlines = Deadlines()  # (its sweep's first tick is TICK after this dial starts)
        router = Router(spec, loop.time)
        conn = Conn(None, loop.time(), 80)
        conn.key = 1
        open_route(router, conn)
        plane = DataPlane({}, None)
        plane.attach(loop)
        plane.deadlines = deadlines
        running: list[asyncio.Task[str]] = []

        async def run() -> str:
            step = Dial(
                loop, lambda _: asyncio.Protocol(), None, timeout=within, source=None,
                transparent=False,
            )  # fmt: skip
            return await connect(plane, router, conn, step, wait=True, task=running[0])

        running.append(loop.create_task(run(), name="dial"))
        return router, running[0]

    router, task = start(0.05)
    t0 = loop.time()
    assert await task == NO_BACKEND  # the one backend timed out: no backend
    assert router.stats.failed_timeout == 1
    assert 0.045 <= loop.time() - t0 < 0.05 + Deadlines.TICK + 0.5  # (uvloop's clock: ms)
    assert not deadlines.waiting
    _, task = start(5)
    loop.call_later(0.05, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    _, task = start(0.01)
    loop.call_later(0.03, task.cancel)  # past the deadline, before the sweep came: the client's
    with pytest.raises(asyncio.CancelledError):
        await task
    _, task = start(0.01)

    def both() -> None:  # past the deadline, the sweep and the client's cancel in one turn
        deadlines._sweep(loop)
        task.cancel()

    loop.call_later(0.03, both)  # (before the sweep's own first tick)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_backend_closes_the_client_at_once() -> None:
    port, dead1, dead2 = free_ports(3)
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [
                f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {dead1}}}}}",
                f"- {{name: b, address: 127.0.0.1, ports: {{{port}: {dead2}}}}}",
            ],
        )
    )
    async with running(cfg) as server:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello")
        # A FIN, or an RST when the kernel still held unread bytes of ours: either way, at once.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        stats = server.routers["web"].stats
        assert stats.no_backend == 1 and stats.connect_failures == 2
        assert not server.plane.live


async def test_table_bound_evicts_oldest_idle_then_goes_unpinned(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], persistence_extra=", max_entries: 2")
    )
    async with running(cfg) as server:
        table = server.routers["web"].table
        assert table is not None
        await hello(port, "127.0.0.1")
        await hello(port, "127.0.0.2")
        await hello(port, "127.0.0.3")
        assert table.evictions == 1 and len(table) == 2
        assert table.get(0x7F000001) is None
        held = [await greet(port, f"127.0.0.{i}") for i in (2, 3)]
        assert await hello(port, "127.0.0.4") in ("b0", "b1")
        assert server.routers["web"].stats.unpinned == 1
        for _, _, w in held:
            w.close()


async def test_ipv6_clients_through_loopback(backends) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    (port,) = free_ports(1, "::1")
    (b,) = await backends(1, [port], host="::1")
    cfg = config_of(group_yaml("web", [port], [b.yaml()], listen='["::1"]'))
    async with running(cfg) as server:
        assert await hello(port, "::1", host="::1") == b.name
        (entry,) = server.routers["web"].table.entries()
        assert entry.key == (1 | (1 << 128))


async def test_dual_stack_listener_keys_ipv4_clients_as_ipv4(backends) -> None:
    (port,) = free_ports(1, "::")
    (b,) = await backends(1, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml()], listen='["::"]', netmask="/24"))
    async with running(cfg) as server:
        assert await hello(port, "127.0.0.9") == b.name
        (entry,) = server.routers["web"].table.entries()
        assert entry.key == 0x7F000000


async def test_backend_without_port_map_gets_the_clients_port(cleanup) -> None:
    p1, p2 = free_ports(2)
    b = await cleanup(NamedBackend("same", host="127.0.0.2")).start([p1, p2], same_port=True)
    cfg = config_of(group_yaml("web", [p1, p2], ["- {name: same, address: 127.0.0.2}"]))
    async with running(cfg):
        assert await hello(p1) == "same" and await hello(p2) == "same"
    assert b.connections == 2


async def test_idle_timeout_closes_a_silent_connection(backends) -> None:
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml()], extra="idle_timeout: 300ms"))
    async with running(cfg) as server:
        loop = asyncio.get_running_loop()
        _, r, w = await greet(port)
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        t0 = loop.time()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert 0.25 < loop.time() - t0 < 2
        w.close()
        await asyncio.wait_for(server.wait_quiet(), 5)


async def test_client_reset_is_passed_to_the_backend(cleanup) -> None:
    (port,) = free_ports(1)
    got_reset = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi\n")
        try:
            while await r.read(1024):
                pass
        except ConnectionResetError:
            got_reset.set()
        w.close()

    srv = cleanup(await asyncio.start_server(handle, "127.0.0.1", 0))
    bport = srv.sockets[0].getsockname()[1]
    cfg = config_of(
        group_yaml(
            "web", [port], [f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}"]
        )
    )
    async with running(cfg):
        loop = asyncio.get_running_loop()
        s = cleanup(socket.socket())
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        assert await loop.sock_recv(s, 3) == b"hi\n"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        await asyncio.wait_for(got_reset.wait(), 5)


async def test_slow_reader_keeps_the_relay_bounded(cleanup) -> None:
    """A backend streams 32 MiB to a client that does not read: the proxy stops reading the
    backend instead of buffering, and its write buffer stays near the high-water mark."""
    (port,) = free_ports(1)
    backend_blocked = asyncio.Event()
    total = 32 * 1024 * 1024

    class Flood(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.t = transport
            self.sent = 0
            transport.set_write_buffer_limits(1 << 20, 1 << 18)
            self.push()

        def push(self) -> None:
            while self.sent < total and not backend_blocked.is_set():
                self.t.write(b"x" * 65536)
                self.sent += 65536

        def pause_writing(self) -> None:
            backend_blocked.set()

        def resume_writing(self) -> None:
            backend_blocked.clear()
            self.push()
            if self.sent >= total:
                self.t.write_eof()

    loop = asyncio.get_running_loop()
    srv = cleanup(await loop.create_server(Flood, "127.0.0.1", 0))
    bport = srv.sockets[0].getsockname()[1]
    cfg = config_of(
        group_yaml(
            "web", [port], [f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}"]
        )
    )
    async with running(cfg) as server:
        s = cleanup(socket.socket())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await asyncio.wait_for(backend_blocked.wait(), 10)
        (conn,) = server.plane.live
        # The proxy's buffer towards the client: at most the high-water mark plus one read.
        assert conn.transport.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
        assert conn.peer is not None and conn.peer.transport.get_write_buffer_size() == 0
        # Now read it all: every byte arrives.
        received = 0
        while chunk := await loop.sock_recv(s, 1 << 20):
            received += len(chunk)
        assert received == total


async def test_shutdown_waits_for_open_connections_then_resets(backends) -> None:
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml()]))
    server = Server(cfg)
    await server.start()
    try:
        _, r, w = await greet(port)
        t0 = asyncio.get_running_loop().time()
        await server.shutdown(grace=0.3)
        elapsed = asyncio.get_running_loop().time() - t0
        assert 0.25 < elapsed < 3
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    finally:
        await server.shutdown(grace=0)


async def test_spliced_connections_pass_resets_time_out_when_idle_and_are_reset_at_shutdown(
    cleanup,
) -> None:
    """The zero-copy relay keeps the copy relay's promises: a client's reset reaches the backend,
    a silent connection is closed after idle_timeout, and shutdown resets what is left."""
    if not hasattr(os, "splice"):
        pytest.skip("os.splice is Linux-only")
    (port,) = free_ports(1)
    resets = asyncio.Queue()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            await resets.put("eof")
        except ConnectionResetError:
            await resets.put("reset")
        w.close()

    srv = cleanup(await asyncio.start_server(handle, "127.0.0.1", 0))
    bport = srv.sockets[0].getsockname()[1]
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}"],
            extra="relay: splice\nidle_timeout: 300ms",
        )
    )
    server = Server(cfg)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        # 1. A reset from the client reaches the backend as a reset.
        s = cleanup(socket.socket())
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, b"ping")
        assert await loop.sock_recv(s, 4) == b"ping"
        (conn,) = server.plane.live
        assert conn.splice is not None  # really on the zero-copy path
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        assert await asyncio.wait_for(resets.get(), 5) == "reset"
        await asyncio.wait_for(server.wait_quiet(), 5)
        # 2. Silence past idle_timeout closes both sides with a FIN.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        t0 = loop.time()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert 0.25 < loop.time() - t0 < 2
        assert await asyncio.wait_for(resets.get(), 5) == "eof"
        w.close()
        await asyncio.wait_for(server.wait_quiet(), 5)
        # 3. Shutdown: open connections get the grace period, then a reset.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        await server.shutdown(grace=0.1)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
    finally:
        await server.shutdown(grace=0)


async def test_a_stepper_runs_a_coroutine_as_a_task_would_and_cancels_alike() -> None:
    """Issue 26, point 3: the dial runs without a Task (`dialer.Stepper`). It runs the
    coroutine to its first await at once; a cancel while it waits cancels the awaited future;
    a cancel after that future completed but before the coroutine resumed still reaches the
    coroutine (as a Task's `_must_cancel`); `uncancel` counts down the cancels."""
    from l4lb.dataplane.dialer import Stepper

    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def body(fut: asyncio.Future[int]) -> None:
        seen.append("started")
        try:
            seen.append(f"got {await fut}")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    fut: asyncio.Future[int] = loop.create_future()
    s = Stepper()
    s.start(body(fut))
    assert seen == ["started"] and not s.done()  # ran to its first await, now
    fut.set_result(7)
    await asyncio.sleep(0)
    assert seen == ["started", "got 7"] and s.done() and not s.cancel()

    seen.clear()
    fut = loop.create_future()
    s = Stepper()
    s.start(body(fut))
    assert s.cancel() and fut.cancelled()  # the awaited future is cancelled ...
    await asyncio.sleep(0)
    assert seen == ["started", "cancelled"] and s.done()  # ... and the coroutine sees it

    seen.clear()
    fut = loop.create_future()
    s = Stepper()
    s.start(body(fut))
    fut.set_result(1)  # done: its callback (the next step) is on its way ...
    assert s.cancel() and s.cancel()  # ... when two cancels come
    assert s.uncancel() == 1  # one of them taken back: one still stands
    await asyncio.sleep(0)
    assert seen == ["started", "cancelled"] and s.done()

    class NoneOnCancel(asyncio.Future):  # as uvloop's sock_connect future answers
        def cancel(self, msg=None):  # type: ignore[no-untyped-def]
            super().cancel(msg)

    seen.clear()
    fut = NoneOnCancel()
    s = Stepper()
    s.start(body(fut))
    assert s.cancel()  # (it failed here, compiled: "bool object expected; got None")
    await asyncio.sleep(0)
    assert seen == ["started", "cancelled"] and s.done()
