"""The shared affinity store: two real l4lb processes sharing a real redis-server, curl as the
clients, and Redis stopped, frozen and started again under them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from l4lb.config import BackendSpec, Config
from l4lb.core.backends import Backend
from l4lb.core.schedulers import rendezvous
from tests.support.helpers import config_of, free_ports, greet, group_yaml, hello, running
from tests.support.procs import (
    processes,
    redis_argv,
    start_backend,
    start_l4lb,
    wait_for_line,
    wait_port,
)

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (.ci/run installs Debian's redis-server)",
)


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_argv(self.port),
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_for_line(self.proc, "stdout", "Ready to accept connections")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_ports(1)[0])
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- rendezvous


def make_backends(*names: str, weights: dict[str, int] | None = None) -> list[Backend]:
    w = weights or {}
    return [
        Backend(BackendSpec(name=n, address="127.0.0.1", ports={80: 80}, weight=w.get(n, 1)), i)
        for i, n in enumerate(names)
    ]


def test_rendezvous_agrees_whatever_the_order_and_moves_only_a_lost_backends_keys() -> None:
    three = make_backends("a", "b", "c")
    keys = range(0x0A000000, 0x0A000000 + 30000 * 256, 256)
    first = {k: rendezvous(k, three).name for k in keys}  # type: ignore[union-attr]
    assert {k: rendezvous(k, three[::-1]).name for k in keys} == first  # type: ignore[union-attr]
    counts = {n: list(first.values()).count(n) for n in "abc"}
    assert all(9000 < c < 11000 for c in counts.values()), counts
    two = [b for b in three if b.name != "b"]
    after = {k: rendezvous(k, two).name for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if after[k] != first[k]]
    assert all(first[k] == "b" for k in moved) and len(moved) == counts["b"]
    heavy = make_backends("a", "b", "c", weights={"a": 2})
    share = sum(rendezvous(k, heavy).name == "a" for k in keys) / len(keys)  # type: ignore[union-attr]
    assert 0.47 < share < 0.53


# --------------------------------------------------------------------------- one process, in the loop


def store_top(port: int, budget: str = "1s") -> str:
    """The store's section. A test of what the store holds gives a lookup a second (a busy
    machine once took a 50 ms budget past its first lookup in CI: the pin went to the
    consistent hash and the test found no key); the budget's own tests set theirs."""
    return (
        f"affinity_store: {{type: redis, url: 'redis://127.0.0.1:{port}/0', key_prefix: 't:',"
        f" budget: {budget}, retry_interval: 200ms}}\n"
    )


async def store_site(backends, redis_server: RedisServer, persistence: str) -> tuple[int, Config]:
    port = free_ports(1)[0]
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], timeout=persistence, netmask="/24"),
        top=store_top(redis_server.port),
    )
    return port, cfg


@needs_redis
async def test_a_pin_lives_in_redis_for_the_timeout_renewed_by_a_new_connection(
    backends, redis_server: RedisServer
) -> None:
    """The TTL is the persistence timeout (30 s here, so the lease, every 10 s, stays out of
    the way). Time is what is tested, so this test waits for it, a little over 2 s."""
    port, cfg = await store_site(backends, redis_server, "30s")
    r = redis_server.client()
    async with running(cfg):
        name, _reader, w = await greet(port, "127.0.44.5")
        key = "t:web:7f002c00"
        assert r.get(key) == name.encode()
        assert 29_000 < r.pttl(key) <= 30_000
        w.close()
        await asyncio.sleep(1.2)
        left = r.pttl(key)
        assert left < 29_500
        # A new connection of the known client: no Redis on its path, but the next flush
        # (once a second) renews the entry.
        name2, _reader, w = await greet(port, "127.0.44.6")
        assert name2 == name
        await asyncio.sleep(1.1)
        assert r.pttl(key) > left + 500
        w.close()
    r.close()


@needs_redis
async def test_a_pin_is_held_in_redis_while_a_connection_is_open(
    backends, redis_server: RedisServer
) -> None:
    """Open past the timeout (2 s): the lease keeps renewing the entry. Waits 3 s."""
    port, cfg = await store_site(backends, redis_server, "2s")
    r = redis_server.client()
    async with running(cfg):
        name, _reader, w = await greet(port, "127.0.44.5")
        assert 1500 < r.pttl("t:web:7f002c00") <= 2000
        await asyncio.sleep(3.0)
        assert r.get("t:web:7f002c00") == name.encode()
        w.close()
    r.close()


# --------------------------------------------------------------------------- two processes


def curl(port: int, src: str) -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", "--interface", src, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else f"FAILED (curl exit {out.returncode})"


def instance(
    tmp_path: Path,
    name: str,
    port: int,
    rport: int,
    bports: list[int],
    scheduler: str,
    order: list[int],
    workers: int = 1,
) -> Path:
    lines = "\n".join(
        f"      - {{name: b{i}, address: 127.0.0.1, ports: {{{port}: {bports[i]}}}}}" for i in order
    )
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        store_top(rport, "100ms")
        + f"""workers: {workers}
groups:
  web:
    listen: [127.0.0.1]
    ports: [{port}]
    scheduler: {scheduler}
    persistence: {{timeout: 10m, netmask: /24}}
    backends:
{lines}
"""
    )
    return cfg


@needs_redis
def test_two_instances_share_pins_and_survive_redis_stopping(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    p1, p2, *bports = free_ports(6)
    with processes() as procs:
        for i, bp in enumerate(bports):
            procs.append(start_backend(f"b{i}", http=f"127.0.0.1:{bp}"))
        for bp in bports:
            wait_port(bp)
        # Different schedulers and backend orders: only the shared table can make them agree.
        # Instance one runs two workers, each with its own connection to Redis.
        one = start_l4lb(
            instance(tmp_path, "one", p1, redis_server.port, bports, "rr", [0, 1, 2, 3], 2)
        )
        two = start_l4lb(
            instance(tmp_path, "two", p2, redis_server.port, bports, "lc", [3, 2, 1, 0])
        )
        procs += [one, two]

        first: dict[int, str] = {}
        for net in range(50, 62):  # a new client at one instance, then at the other, and back
            a = curl(p1 if net % 2 else p2, f"127.0.{net}.1")
            b = curl(p2 if net % 2 else p1, f"127.0.{net}.2")
            c = curl(p1 if net % 2 else p2, f"127.0.{net}.3")
            assert a == b == c, f"127.0.{net}.0/24: {a}, {b}, {c}"
            first[net] = a
        assert len(set(first.values())) >= 2, first
        assert set(redis_server.client().keys("t:web:*")) == {
            f"t:web:7f00{net:02x}00".encode() for net in first
        }

        # A backend dies: each instance finds out by itself, and the first re-pin is everyone's.
        dead = first[50]
        victim = procs[int(dead[1:])]
        victim.terminate()
        victim.wait(10)
        for net in [n for n in first if first[n] == dead]:
            a, b = curl(p1, f"127.0.{net}.5"), curl(p2, f"127.0.{net}.6")
            assert a == b != dead and "FAILED" not in a, f"127.0.{net}.0/24: {a} vs {b}"
            first[net] = a

        # Redis stops: no connection fails; new clients agree through the consistent hash;
        # clients each instance knows keep their backends.
        redis_server.stop()
        during: dict[int, str] = {}
        for net in range(70, 82):
            a, b = curl(p1, f"127.0.{net}.1"), curl(p2, f"127.0.{net}.2")
            assert "FAILED" not in a + b
            assert a == b, f"127.0.{net}.0/24 during the outage: {a} vs {b}"
            during[net] = a
        for net in range(50, 62):
            assert curl(p1 if net % 2 else p2, f"127.0.{net}.4") == first[net]

        # Redis returns (empty): each instance writes its pins back, and they agree.
        redis_server.start()
        # ("is back" after an outage it saw, "lost its data" if it saw none: both write back)
        for lb in (one, one, two):  # one has two workers, and each writes its own pins
            wait_for_line(lb, "stderr", "local pins")
        stored = {
            k.decode(): v.decode()
            for k in redis_server.client().keys("t:web:*")
            if (v := redis_server.client().get(k)) is not None
        }
        for net, name in [*first.items(), *during.items()]:
            assert stored[f"t:web:7f00{net:02x}00"] == name

        # New clients after the restart: the claim script is loaded again, and shared.
        for net in range(84, 88):
            a, b = curl(p1, f"127.0.{net}.1"), curl(p2, f"127.0.{net}.2")
            assert a == b and "FAILED" not in a
            assert redis_server.client().get(f"t:web:7f00{net:02x}00") == a.encode()

        # Redis frozen: a lookup runs out of its budget, and the client still gets through.
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            a, b = curl(p1, "127.0.90.1"), curl(p2, "127.0.90.2")
            assert "FAILED" not in a + b and a == b
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)


def cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster-bus twins (port + 10000) are free too, below the ephemeral
    range so that no client's source port takes one meanwhile."""
    out: list[int] = []
    for port in random.sample(range(20000, 22767), 200):
        socks = []
        try:
            for p in (port, port + 10000):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        out.append(port)
        if len(out) == n:
            return out
    raise AssertionError("no free ports for a Redis Cluster")


def cluster_ok(port: int) -> bool:
    info = ["redis-cli", "-p", str(port), "cluster", "info"]
    return b"cluster_state:ok" in subprocess.run(info, capture_output=True, timeout=5).stdout


@contextlib.contextmanager
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Three masters with no replicas, made a cluster by redis-cli: the smallest real one."""
    ports = cluster_ports(3)
    procs = []
    try:
        for p in ports:
            d = tmp_path / f"node{p}"
            d.mkdir()
            proc = subprocess.Popen(
                redis_argv(
                    p,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(d / "nodes.conf"),
                    "--dir",
                    str(d),
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            wait_for_line(proc, "stdout", "Ready to accept connections")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        # Every node must see the cluster whole before it is used (gossip: there is no event
        # to await, so ask, for at most 30 s).
        deadline = time.monotonic() + 30
        for p in ports:
            while not cluster_ok(p):
                assert time.monotonic() < deadline, f"node {p}: the cluster did not form"
                time.sleep(0.05)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


@needs_redis
async def test_two_instances_share_pins_through_a_redis_cluster(backends, tmp_path: Path) -> None:
    port1, port2 = free_ports(2)
    bs = await backends(3, [port1, port2])
    with redis_cluster(tmp_path) as nodes:
        top = (
            f"affinity_store: {{type: redis, url: 'redis://127.0.0.1:{nodes[0]}/0', cluster: true,"
            " key_prefix: 'c:', budget: 200ms}\n"
        )
        one = config_of(
            group_yaml(
                "web", [port1, port2], [b.yaml() for b in bs], scheduler="rr", netmask="/24"
            ),
            top=top,
        )
        two = config_of(
            group_yaml(
                "web", [port1, port2], [b.yaml() for b in bs[::-1]], scheduler="lc", netmask="/24"
            ),
            top=top,
        )
        # Two instances on one machine: the same group, each on its own port of it.
        one = replace(one, groups=(replace(one.groups[0], ports=(port1,)),))
        two = replace(two, groups=(replace(two.groups[0], ports=(port2,)),))
        async with running(one) as a, running(two) as b:
            assert a.store is not None and b.store is not None and a.store.up and b.store.up
            seen = {}
            for net in range(20):
                first = await hello(port1, f"127.0.{net}.1")
                assert await hello(port2, f"127.0.{net}.2") == first
                seen[net] = first
            assert a.store.stats.stored == 20 and b.store.stats.found == 20
        counts = [redis.Redis(port=p).dbsize() for p in nodes]
        assert sum(counts) == 20 and all(counts), f"keys per node: {counts}"


@needs_redis
async def test_a_new_clients_parallel_connections_all_follow_the_shared_pin(
    backends, redis_server: RedisServer
) -> None:
    """Another instance pinned 127.0.45.0/24 to b1; this one's scheduler (fo) would pick b0.
    A browser's six parallel first connections must all wait for the lookup and reach b1."""
    port = free_ports(1)[0]
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], scheduler="fo", netmask="/24"),
        top=store_top(redis_server.port),
    )
    r = redis_server.client()
    r.set("t:web:7f002d00", bs[1].name, px=60_000)
    async with running(cfg) as server:
        opened = await asyncio.gather(*(greet(port, f"127.0.45.{i}") for i in range(2, 8)))
        assert [name for name, _, _ in opened] == [bs[1].name] * 6
        assert server.store is not None and server.store.stats.found == 1
        for _, _, w in opened:
            w.close()
    r.close()


def test_a_store_password_never_reaches_the_logs() -> None:
    from l4lb.dataplane.store import redact

    assert redact("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert (
        redact("rediss://app:pw@redis.internal:6380/1") == "rediss://app:***@redis.internal:6380/1"
    )
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"


@needs_redis
def test_a_repin_after_a_refused_dial_is_settled_through_the_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Four client networks pinned to one backend, which dies before any check sees it: each
    network asks B, then A, then B. Every re-pin goes through the compare-and-set, so the
    first instance's choice is the other's too, the first network included."""
    pa, pb, *bports = free_ports(6)

    def config(name: str, port: int, scheduler: str, order: list[int]) -> Path:
        lines = "\n".join(
            f"      - {{name: b{i}, address: 127.0.0.1, weight: {4 - i if scheduler == 'fo' else 1},"
            f" ports: {{{port}: {bports[i]}}}}}"
            for i in order
        )
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            store_top(redis_server.port, "200ms")
            + f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
            f"    scheduler: {scheduler}\n    persistence: {{timeout: 10m, netmask: /24}}\n"
            f"    backends:\n{lines}\n"
        )
        return cfg

    with processes() as procs:
        for i, bp in enumerate(bports):
            procs.append(start_backend(f"b{i}", http=f"127.0.0.1:{bp}"))
            wait_port(bp)
        # Failover (b0 weighs most) pins every network to b0 at both instances...
        a = start_l4lb(config("a", pa, "fo", [0, 1, 2, 3]))
        b = start_l4lb(config("b", pb, "fo", [0, 1, 2, 3]))
        procs += [a, b]
        nets = range(100, 104)
        for net in nets:
            assert curl(pa, f"127.0.{net}.1") == "b0" and curl(pb, f"127.0.{net}.2") == "b0"
        # ...then each takes a scheduler of its own (pins stay): only the store can make a
        # re-pin agree. No health checks: b0's death is seen by refused dials alone.
        for lb, (name, port, sched, order) in (
            (a, ("a", pa, "rr", [0, 1, 2, 3])),
            (b, ("b", pb, "lc", [3, 2, 1, 0])),
        ):
            config(name, port, sched, order)
            lb.send_signal(signal.SIGHUP)
            wait_for_line(lb, "stderr", "reloaded")
        procs[0].terminate()
        procs[0].wait(10)
        for net in nets:
            seen = [
                curl(pb, f"127.0.{net}.3"),
                curl(pa, f"127.0.{net}.4"),
                curl(pb, f"127.0.{net}.5"),
            ]
            assert len(set(seen)) == 1 and seen[0] != "b0" and "FAILED" not in seen[0], (net, seen)
            assert redis_server.client().get(f"t:web:7f00{net:02x}00") == seen[0].encode()


@needs_redis
async def test_a_claim_answered_after_its_budget_is_what_the_next_connection_follows(
    backends, redis_server: RedisServer
) -> None:
    """Redis frozen past the budget: the client goes to the consistent hash. The claim was
    sent, though, and Redis applies it when it wakes: the local entry then takes what Redis
    holds (the scheduler's candidate), so this instance agrees with the others at once."""
    port = free_ports(1)[0]
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], scheduler="fo", netmask="/24"),
        top=store_top(redis_server.port, "50ms").replace("200ms", "30s"),  # no probe meanwhile
    )
    r = redis_server.client()
    async with running(cfg) as server:
        router = server.routers["web"]
        # A client network whose consistent hash is b1, while fo's candidate is b0.
        net = next(
            n
            for n in range(1, 250)
            if rendezvous(0x7F000000 | n << 8, router.backends) is router.backends[1]
        )
        assert redis_server.proc is not None and server.store is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            assert await hello(port, f"127.0.{net}.1") == bs[1].name  # the hash, in the outage
            late = list(server.store.late_claims)
            assert len(late) == 1
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*late, return_exceptions=True), 10)
        assert r.get(f"t:web:7f00{net:02x}00") == bs[0].name.encode()
        assert await hello(port, f"127.0.{net}.2") == bs[0].name  # what Redis holds
    r.close()
