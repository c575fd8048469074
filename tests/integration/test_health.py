"""Health: verdicts, quorum, every probe type against real servers, and the monitor driving the
balancer with real backends that are killed, restarted and made to fail."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import sys
from pathlib import Path

import pytest

from l4lb.checks.probes import probe
from l4lb.config import HealthCheckSpec, load_config_text
from l4lb.core.backends import State
from l4lb.core.routing import Router
from tests.support.helpers import (
    FakeClock,
    config_of,
    free_ports,
    greet,
    group_yaml,
    hello,
    running,
)

TLS_DIR = Path(__file__).resolve().parents[2] / "l4lb" / "demo_tls"

# ------------------------------------------------------------------ pure state machines


GROUP = """
groups:
  web:
    ports: [80]
    scheduler: rr
    persistence: {timeout: 60s}
    sorry_server: {address: 10.9.9.9}
    quorum: 1
    on_up: %s
    backends:
      - {name: a, address: 10.0.0.1}
      - {name: b, address: 10.0.0.2}
      - {name: c, address: 10.0.0.3, inhibit_on_failure: true}
"""


def router(on_up: str = "stay") -> Router:
    return Router(load_config_text(GROUP % on_up).groups[0], FakeClock(), random.Random(0))


def route_once(r: Router, key: int) -> str:
    route = r.begin(key)
    b = r.next_backend(route)
    assert b is not None
    r.connected(route, b)
    r.finish(route)
    return b.name


def test_router_states_sorry_server_and_events() -> None:
    r = router()
    events = []
    r.listener = events.append
    a, b, c = r.backends
    pinned = {k: route_once(r, k) for k in range(6)}
    r.set_health(a, False, "test")
    assert all(route_once(r, k) != "a" for k in range(6))  # a's clients moved
    assert r.stats.repins_unavailable == sum(1 for v in pinned.values() if v == "a")
    r.set_health(c, False, "test")  # inhibited: keeps its pins, takes no new clients
    assert all(route_once(r, k) == "c" for k, v in pinned.items() if v == "c")
    assert route_once(r, 100) == "b"
    assert not r.quorum.lost
    r.set_admin(b, State.DRAIN)
    assert r.quorum.lost and route_once(r, 200) == "sorry_server"
    assert r.table is not None and r.table.get(200) is None  # never pinned to the sorry server
    assert [(e.backend, e.old, e.new) for e in events][-2:] == [
        ("b", "up", "drain"),
        (None, "standby", "serving"),
    ]
    r.set_admin(b, State.UP)
    r.set_health(a, True, "test")
    assert not r.quorum.lost and route_once(r, 200) in ("a", "b")


def test_on_up_return_brings_clients_back() -> None:
    for on_up, expect_back in (("return", True), ("stay", False)):
        r = router(on_up)
        a = r.backends[0]
        key = next(k for k in range(50) if route_once(r, k) == "a")
        r.set_health(a, False, "test")
        assert route_once(r, key) != "a"
        r.set_health(a, True, "test")
        assert (route_once(r, key) == "a") is expect_back
        assert r.stats.repins_returned == (1 if expect_back else 0)


def test_passive_failures_mark_down_at_once() -> None:
    r = router()
    a = r.backends[0]
    for _ in range(3):
        route = r.begin(999)
        r.next_backend(route)
        r.failed(route, a)
        r.give_up(route)
    assert not a.healthy and a.state is State.DOWN


# ------------------------------------------------------------------ probes against real servers


async def serve(handler, **kw) -> asyncio.AbstractServer:  # type: ignore[no-untyped-def]
    return await asyncio.start_server(handler, "127.0.0.1", 0, **kw)


def port_of(srv: asyncio.AbstractServer) -> int:
    return srv.sockets[0].getsockname()[1]


def http_answer(status: int, body: bytes = b"ok"):  # type: ignore[no-untyped-def]
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    return handler


async def test_tcp_probe(cleanup) -> None:
    srv = cleanup(await serve(lambda r, w: w.close()))
    spec = HealthCheckSpec(type="tcp", timeout=1)
    assert await probe(spec, "127.0.0.1", port_of(srv), "x") == (True, "connected")
    (dead,) = free_ports(1)
    ok, detail = await probe(spec, "127.0.0.1", dead, "x")
    assert not ok and "refused" in detail


async def test_tcp_send_expect(cleanup) -> None:
    async def pong(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await r.readline() == b"PING\r\n":
            w.write(b"+PONG\r\n")
        else:
            w.write(b"-ERR\r\n")
        await w.drain()
        w.close()

    srv = cleanup(await serve(pong))
    spec = HealthCheckSpec(type="tcp", timeout=1, send="PING\r\n", expect=r"^\+PONG")
    assert (await probe(spec, "127.0.0.1", port_of(srv), "x"))[0]
    bad = HealthCheckSpec(type="tcp", timeout=1, send="HELLO\r\n", expect=r"^\+PONG")
    ok, detail = await probe(bad, "127.0.0.1", port_of(srv), "x")
    assert not ok and "did not match" in detail


async def test_http_probe_status_and_body(cleanup) -> None:
    good = cleanup(await serve(http_answer(200, b"all good")))
    bad = cleanup(await serve(http_answer(500)))
    spec = HealthCheckSpec(type="http", path="/healthz", timeout=1)
    assert await probe(spec, "127.0.0.1", port_of(good), "x") == (True, "HTTP 200")
    assert await probe(spec, "127.0.0.1", port_of(bad), "x") == (False, "HTTP 500")
    with_body = HealthCheckSpec(type="http", path="/", timeout=1, body="good")
    assert (await probe(with_body, "127.0.0.1", port_of(good), "x"))[0]
    missing = HealthCheckSpec(type="http", path="/", timeout=1, body="great")
    assert not (await probe(missing, "127.0.0.1", port_of(good), "x"))[0]
    accept_500 = HealthCheckSpec(type="http", path="/", timeout=1, status=(200, 500))
    assert (await probe(accept_500, "127.0.0.1", port_of(bad), "x"))[0]


async def test_probes_survive_hanging_garbage_and_flooding_targets(cleanup) -> None:
    async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # never answers; returns when the checker gives up and closes
        w.close()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"\x00\xffnot http at all\r\n\r\n")
        await w.drain()
        w.close()

    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            for _ in range(2000):  # 128 MiB at most, without a line break
                w.write(b"A" * 65536)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    spec = HealthCheckSpec(type="http", path="/", timeout=0.3)
    loop = asyncio.get_running_loop()
    for handler, expected in (
        (hang, "timed out"),
        (garbage, "not an HTTP answer"),
        (flood, "not an HTTP answer"),
    ):
        srv = cleanup(await serve(handler))
        t0 = loop.time()
        ok, detail = await probe(spec, "127.0.0.1", port_of(srv), "x")
        assert not ok and expected in detail, detail
        assert loop.time() - t0 < 1.0


async def test_tls_probe(cleanup) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(TLS_DIR / "cert.pem", TLS_DIR / "key.pem")
    good = cleanup(await serve(http_answer(200), ssl=ctx))

    async def not_tls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # a plain server's answer to a ClientHello
        await w.drain()
        w.close()

    plain = cleanup(await serve(not_tls))
    spec = HealthCheckSpec(type="tls", timeout=1)
    assert await probe(spec, "127.0.0.1", port_of(good), "x") == (True, "TLS handshake completed")
    ok, detail = await probe(spec, "127.0.0.1", port_of(plain), "x")
    assert not ok and detail.startswith("TLS"), detail
    then_http = HealthCheckSpec(type="tls", timeout=1, path="/healthz")
    assert await probe(then_http, "127.0.0.1", port_of(good), "x") == (True, "HTTP 200")
    verified = HealthCheckSpec(type="tls", timeout=1, verify=True, server_name="localhost")
    ok, detail = await probe(verified, "127.0.0.1", port_of(good), "x")
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in detail  # self-signed, not trusted


async def test_exec_probe(tmp_path: Path) -> None:
    ok_spec = HealthCheckSpec(
        type="exec",
        timeout=5,
        command=("sh", "-c", 'test "$L4LB_BACKEND_ADDRESS:$L4LB_BACKEND_PORT" = 127.0.0.1:18080'),
    )
    assert await probe(ok_spec, "127.0.0.1", 18080, "x") == (True, "exit status 0")
    assert await probe(
        HealthCheckSpec(type="exec", timeout=5, command=("false",)), "127.0.0.1", 1, "x"
    ) == (False, "exit status 1")


async def test_exec_probe_that_forks_and_hangs_is_killed_with_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    spec = HealthCheckSpec(
        type="exec", timeout=0.3, command=("sh", "-c", f"sleep 30 & echo $! > {pidfile}; sleep 30")
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ok, detail = await probe(spec, "127.0.0.1", 1, "x")
    assert not ok and detail == "timed out after 0.3s"
    assert loop.time() - t0 < 2
    child = int(pidfile.read_text())
    # The forked child went with the group: wait for its exit through a pidfd (an event).
    try:
        fd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # already gone and reaped
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        await asyncio.wait_for(gone.wait(), 5)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# ------------------------------------------------------------------ the monitor, end to end


class Switch:
    """An HTTP health endpoint whose answer the test flips."""

    def __init__(self) -> None:
        self.status = 200
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % self.status)
            await w.drain()
            w.close()

        self.server = await asyncio.start_server(handler, "127.0.0.1", 0)
        return port_of(self.server)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


HC = "health_check: {type: %s, interval: 100ms, timeout: 200ms, rise: 2, fall: 2%s}"


def is_change(backend: str, new: str):  # type: ignore[no-untyped-def]
    return lambda e: e.backend == backend and e.new == new


async def test_killed_backend_goes_down_in_time_its_clients_move_and_it_comes_back(
    backends,
) -> None:
    (port,) = free_ports(1)
    bs = await backends(3, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], scheduler="rr", extra=HC % ("tcp", ""))
    )
    async with running(cfg) as server:
        loop = asyncio.get_running_loop()
        before = {f"127.0.8.{i}": await hello(port, f"127.0.8.{i}") for i in range(1, 13)}
        victim = bs[0]
        t0 = loop.time()
        await victim.stop()
        event = await asyncio.wait_for(server.monitor.wait_event(is_change(victim.name, "down")), 5)
        took = loop.time() - t0
        # fall x interval (+10% jitter) + one timeout, and slack for a loaded machine
        assert took <= 2 * 0.1 * 1.1 + 0.2 + 0.3, took
        assert "tcp check failed 2x" in event.reason
        after = {src: await hello(port, src) for src in before}  # every connection succeeds
        for src, name in before.items():
            assert (after[src] != victim.name) if name == victim.name else (after[src] == name)
        assert server.routers["web"].stats.no_backend == 0
        await victim.restart()
        await asyncio.wait_for(server.monitor.wait_event(is_change(victim.name, "up")), 5)
        assert server.routers["web"].by_name[victim.name].state is State.UP


async def test_drain_keeps_pinned_clients_and_admits_no_new_ones(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml() for b in bs], scheduler="rr"))
    async with running(cfg) as server:
        router = server.routers["web"]
        pinned = {f"127.0.9.{i}": await hello(port, f"127.0.9.{i}") for i in range(1, 9)}
        router.set_admin(router.by_name["b0"], State.DRAIN)
        assert all([await hello(port, src) == name for src, name in pinned.items()])
        assert all([await hello(port, f"127.0.10.{i}") == "b1" for i in range(1, 9)])


async def test_sorry_server_takes_over_when_all_are_down_and_gives_back(backends, cleanup) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    (sorry,) = await backends(1, [port], prefix="sorry")
    switches = [Switch(), Switch()]
    health_ports = [await cleanup(s).start() for s in switches]
    hport = free_ports(1)[0]
    lines = [
        f"- {{name: {b.name}, address: 127.0.0.1, ports: {{{port}: {b.ports[port]}, {hport}: {hp}}}}}"
        for b, hp in zip(bs, health_ports, strict=True)
    ]
    cfg = config_of(
        group_yaml(
            "web",
            [port, hport],
            lines,
            extra=(HC % ("http", f", port: {hport}"))
            + f"\nsorry_server: {{address: 127.0.0.1, ports: {{{port}: {sorry.ports[port]}, {hport}: {sorry.ports[port]}}}}}",
        )
    )
    async with running(cfg) as server:
        mon = server.monitor
        assert await hello(port, "127.0.11.1") in ("b0", "b1")
        for s in switches:
            s.status = 500
        await asyncio.wait_for(
            mon.wait_event(lambda e: e.backend is None and e.new == "serving"), 5
        )
        assert await hello(port, "127.0.11.1") == sorry.name
        assert await hello(port, "127.0.11.2") == sorry.name
        switches[1].status = 200
        await asyncio.wait_for(
            mon.wait_event(lambda e: e.backend is None and e.new == "standby"), 5
        )
        assert await hello(port, "127.0.11.1") == "b1"
        assert server.routers["web"].stats.sorry == 2


async def test_no_backend_and_no_sorry_server_closes_at_once(backends) -> None:
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml()], extra=HC % ("tcp", "")))
    async with running(cfg) as server:
        await b.stop()
        await asyncio.wait_for(server.monitor.wait_event(is_change(b.name, "down")), 5)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 2) == b""
        w.close()
        assert server.routers["web"].stats.no_backend == 1


async def test_on_down_close_closes_open_connections_and_keep_keeps_them(backends, cleanup) -> None:
    for on_down in ("close", "keep"):
        port, hport = free_ports(2)
        (b,) = await backends(1, [port])
        switch = cleanup(Switch())
        hp = await switch.start()
        line = f"- {{name: {b.name}, address: 127.0.0.1, ports: {{{port}: {b.ports[port]}, {hport}: {hp}}}}}"
        cfg = config_of(
            group_yaml(
                "web",
                [port, hport],
                [line],
                extra=(HC % ("http", f", port: {hport}")) + f"\non_down: {on_down}",
            )
        )
        async with running(cfg) as server:
            _, r, w = await greet(port)
            switch.status = 503
            await asyncio.wait_for(server.monitor.wait_event(is_change(b.name, "down")), 5)
            if on_down == "close":
                assert await asyncio.wait_for(r.read(), 2) == b""
            else:
                w.write(b"still here")
                assert await asyncio.wait_for(r.readexactly(10), 2) == b"still here"
            w.close()


async def test_inhibit_on_failure_keeps_pins_on_a_failed_backend(backends, cleanup) -> None:
    port, hport = free_ports(2)
    bs = await backends(2, [port])
    switch = cleanup(Switch())
    hp = await switch.start()
    lines = [
        f"- {{name: b0, address: 127.0.0.1, inhibit_on_failure: true, ports: {{{port}: {bs[0].ports[port]}, {hport}: {hp}}}}}",
        f"- {{name: b1, address: 127.0.0.1, ports: {{{port}: {bs[1].ports[port]}, {hport}: {hp + 0}}}}}",
    ]
    cfg = config_of(
        group_yaml(
            "web",
            [port, hport],
            lines,
            scheduler="fo",
            extra=HC % ("http", f", port: {hport}"),
        )
    )
    async with running(cfg) as server:
        assert await hello(port, "127.0.12.1") == "b0"
        router = server.routers["web"]
        router.set_health(router.by_name["b0"], False, "test: failed check")
        assert await hello(port, "127.0.12.1") == "b0"  # pinned: kept, as keepalived does
        assert await hello(port, "127.0.12.2") == "b1"  # new: not sent to a failed backend


async def test_passive_failures_then_recovery_probe(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml(
            "web", [port], [b.yaml() for b in bs], scheduler="rr", extra="passive: {failures: 2}"
        )
    )
    async with running(cfg) as server:
        router = server.routers["web"]
        victim = bs[0]
        vport = victim.ports[port]
        await victim.stop()
        for i in range(1, 10):  # every one succeeds, on b1
            assert await hello(port, f"127.0.13.{i}") == "b1"
        assert router.by_name[victim.name].state is State.DOWN
        assert router.stats.connect_failures == 2
        await victim.restart()
        assert victim.ports[port] == vport
        event = await asyncio.wait_for(server.monitor.wait_event(is_change(victim.name, "up")), 10)
        assert "tcp check passed 2x" in event.reason


async def test_max_conns_queue_and_overflow(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    lines = [
        f"- {{name: b0, address: 127.0.0.1, max_conns: 1, ports: {{{port}: {bs[0].ports[port]}}}}}",
        f"- {{name: b1, address: 127.0.0.1, ports: {{{port}: {bs[1].ports[port]}}}}}",
    ]
    for queue_timeout in ("0", "5s"):
        cfg = config_of(
            group_yaml(
                "web", [port], lines, scheduler="fo", extra=f"queue_timeout: {queue_timeout}"
            )
        )
        async with running(cfg) as server:
            name, _r, w = await greet(port, "127.0.14.1")
            assert name == "b0"
            if queue_timeout == "0":
                assert await hello(port, "127.0.14.1") == "b1"  # full: elsewhere, at once
                assert server.routers["web"].table.get(0x7F000E01).backend.name == "b0"  # pin kept
                assert await hello(port, "127.0.14.2") == "b1"  # a new client: not to a full one
                w.close()
            else:
                waiting = asyncio.ensure_future(hello(port, "127.0.14.1"))
                done, _ = await asyncio.wait({waiting}, timeout=0.3)
                assert not done  # queued for b0, not sent elsewhere
                w.close()  # frees b0's slot: the queued client takes it
                assert await asyncio.wait_for(waiting, 5) == "b0"


async def test_notify_command_runs_on_each_change(backends, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    out = tmp_path / "events"
    script = f'echo "$L4LB_GROUP $L4LB_BACKEND $L4LB_OLD_STATE $L4LB_STATE" >> {out}'
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], extra=f"notify: [sh, -c, '{script}']")
    )
    async with running(cfg) as server:
        router = server.routers["web"]
        router.set_admin(router.by_name["b0"], State.DISABLED)
        router.set_admin(router.by_name["b0"], State.UP)
        await server.monitor.notified()
    assert sorted(out.read_text().splitlines()) == ["web b0 disabled up", "web b0 up disabled"]


def test_health_config_errors() -> None:
    from l4lb.config import ConfigError

    base = "groups:\n  web:\n    ports: [80]\n    backends: [{name: a, address: 10.0.0.1}]\n"
    cases = {
        "    health_check: {interval: 1s}\n": "groups.web.health_check: missing required key 'type'",
        "    health_check: {type: ping}\n": "groups.web.health_check.type: expected one of tcp, http, tls, exec",
        "    health_check: {type: tcp, path: /}\n": "groups.web.health_check.path: not used by a tcp check",
        "    health_check: {type: http, port: 81}\n": "groups.web.health_check.port: 81 is not among the group's ports (80)",
        "    health_check: {type: http, status: [99]}\n": "groups.web.health_check.status[0]: must be from 100 to 599",
        "    health_check: {type: exec}\n": "an exec check needs 'command'",
        "    health_check: {type: tcp, expect: '('}\n": "groups.web.health_check.expect: not a valid regular expression",
        "    on_down: drop\n": "groups.web.on_down: expected one of keep, close",
        "    sorry_server: {ports: {80: 81}}\n": "groups.web.sorry_server: missing required key 'address'",
        "    passive: {failures: -1}\n": "groups.web.passive.failures: must be from 0 to 1000",
    }
    for extra, expected in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_config_text(base + extra, "f.yaml")
        assert any(expected in line for line in exc.value.lines), (extra, exc.value.lines)
    c = load_config_text(base + "    quorum: 2\n", "f.yaml")
    assert any("quorum: warning: has no effect without a sorry_server" in w for w in c.warnings)


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("pidfd and process groups as used here are Linux's", allow_module_level=True)


async def test_a_cancelled_check_stops_even_while_a_tls_peer_will_not_close() -> None:
    """A TLS backend that completes the handshake and then never reads again leaves a check
    waiting for its close_notify. Cancelling the check there (the monitor stopping) must
    cancel it, not let it return and carry on: the shutdown waits for it."""
    import socket
    import threading

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(TLS_DIR / "cert.pem", TLS_DIR / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    shook = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        tls = ctx.wrap_socket(conn, server_side=True)  # the handshake, then silence
        held.append(tls)
        shook.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    spec = HealthCheckSpec(type="tls", verify=False, timeout=30.0)
    task = asyncio.ensure_future(probe(spec, "127.0.0.1", port, "b0"))
    try:
        assert await asyncio.to_thread(shook.wait, 10)
        # The check now closes and waits for the peer's close_notify; its progress cannot be
        # observed from here, so give it a moment to get there.
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
    finally:
        thread.join(10)
        for s in held:
            s.close()
        listener.close()
