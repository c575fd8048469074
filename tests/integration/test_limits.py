"""Limits per client network (`client_limits`) and slow start (`slow_start`): the pure rules
with a fake clock, then real backends and real clients from many 127/8 sources."""

from __future__ import annotations

import asyncio
import random

import pytest

from l4lb.config import ClientLimitsSpec, ConfigError, load_config_text
from l4lb.core.backends import State
from l4lb.core.limits import ClientLimits
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

# ------------------------------------------------------------------ the rules


def test_max_conns_counts_open_connections_per_network() -> None:
    limits = ClientLimits(ClientLimitsSpec(max_conns=2), FakeClock())
    assert limits.admit(1) is None and limits.admit(1) is None
    assert limits.admit(1) == "max_conns"
    assert limits.admit(2) is None  # another network is untouched
    limits.release(1)
    assert limits.admit(1) is None
    for key in (1, 1, 2):
        limits.release(key)
    assert limits.open == {}  # a network with nothing open holds no state


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{max_conns: 0}", "client_limits.max_conns: must be from 1"),
        ("{rate: fast}", 'expected a rate such as "50/s"'),
        ("{burst: 10}", "needs max_conns, rate, or both"),
        ("{max_conns: 3, burst: 10}", "client_limits.burst: goes with a rate"),
        ("{rate: 5/s, colour: red}", "unknown key"),
    ],
)
def test_client_limits_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(
            f"groups:\n  web:\n    ports: [1]\n    client_limits: {text}\n    backends: [{{name: a, address: 192.0.2.1}}]\n"
        )
    (line,) = err.value.lines
    assert line.startswith("<memory>:4: groups.web.") and expected in line, line


def test_client_limits_rates() -> None:
    g = load_config_text(
        "groups:\n  web:\n    ports: [1]\n    client_limits: {max_conns: 200, rate: 600/m}\n    backends: [{name: a, address: 192.0.2.1}]\n"
    ).groups[0]
    assert g.client_limits == ClientLimitsSpec(max_conns=200, rate=10.0, burst=10.0)


SLOW = """
groups:
  web:
    ports: [80]
    scheduler: %s
    persistence: {timeout: 0}
    slow_start: 30s
    backends:
      - {name: a, address: 10.0.0.1}
      - {name: b, address: 10.0.0.2}
"""


def share_of_b(r: Router, n: int) -> float:
    """The share of n new connections (left open) that b takes."""
    got = 0
    for i in range(n):
        route = r.begin(i)
        backend = r.next_backend(route)
        assert backend is not None
        r.connected(route, backend)
        got += backend.name == "b"
    return got / n


@pytest.mark.parametrize("scheduler", ["wlc", "wrr", "p2c"])
def test_a_backend_that_comes_back_ramps_from_a_tenth_to_its_weight(scheduler: str) -> None:
    clock = FakeClock()
    r = Router(load_config_text(SLOW % scheduler).groups[0], clock, random.Random(1))
    b = r.backends[1]
    r.set_health(b, False, "test")
    share_of_b(r, 100)  # a carries everything meanwhile
    r.set_health(b, True, "test")
    assert b.eff == pytest.approx(0.1)
    early = share_of_b(r, 200)
    clock.advance(15)
    middle = share_of_b(r, 200)
    clock.advance(16)
    late = share_of_b(r, 400)
    assert b.eff == 1.0 and r.ramping == []
    assert early < 0.2 < middle, (early, middle, late)
    if scheduler in ("wlc", "p2c"):  # load-aware: b started empty, and catches up with a
        assert late > 0.5
    else:
        assert 0.35 < late < 0.65, late


def test_slow_start_is_not_for_start_up_nor_pinned_clients_nor_hashes() -> None:
    clock = FakeClock()
    r = Router(load_config_text(SLOW % "wlc").groups[0], clock, random.Random(1))
    assert all(b.eff == 1.0 for b in r.backends) and r.ramping == []
    mh = Router(load_config_text(SLOW % "mh").groups[0], clock, random.Random(1))
    b = mh.backends[1]
    mh.set_admin(b, State.DISABLED)
    mh.set_admin(b, State.UP)
    keys = [k for k in range(2000) if mh.scheduler.pick(k) is b]
    assert 800 < len(keys) < 1200  # mh ignores slow start: its table is everyone's


# ------------------------------------------------------------------ real clients


async def test_a_network_over_its_limits_is_reset_and_the_others_are_not(backends) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [b.yaml() for b in bs],
            netmask="/24",
            extra="client_limits: {max_conns: 3, rate: 1/s, burst: 8}",
        )
    )
    async with running(cfg) as server:
        opened = [await greet(port, f"127.0.120.{i}") for i in range(1, 4)]  # three, one /24
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await greet(port, "127.0.120.9")  # a fourth from the same network
        # Every other network is untouched, many of them at once.
        others = await asyncio.gather(*(hello(port, f"127.0.{n}.1") for n in range(121, 161)))
        assert all(name in {b.name for b in bs} for name in others)
        for _, _, w in opened:
            w.close()
            await w.wait_closed()
        # The rate: 8 at once (the burst), then refused: 1/s gives one back each second.
        names = []
        for i in range(10):
            try:
                names.append(await hello(port, f"127.0.170.{i + 1}"))
            except (ConnectionResetError, asyncio.IncompleteReadError):
                names.append("reset")
        assert names[:8] != ["reset"] * 8 and names.count("reset") == 2, names
        stats = server.routers["web"].stats
        assert stats.client_limit == 3  # the fourth, and two over the rate
        assert sum(b.connections for b in bs) == 3 + 40 + 8  # nothing refused reached them
        assert server.routers["web"].limits is not None


async def test_slow_start_with_real_backends_and_clients(backends) -> None:
    """wlc, two backends; one is disabled while 40 clients connect, then enabled: new clients
    reach it at a tenth of its share at first, then more, by the router's (fake) clock."""
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    clock = FakeClock()
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [b.yaml() for b in bs],
            scheduler="wlc",
            timeout="0",
            extra="slow_start: 60s",
        )
    )
    async with running(cfg, clock=clock) as server:
        router = server.routers["web"]
        back = router.by_name[bs[1].name]
        router.set_admin(back, State.DISABLED, "test")
        held = [await greet(port, f"127.0.130.{i}") for i in range(1, 41)]
        assert {name for name, _, _ in held} == {bs[0].name}
        router.set_admin(back, State.UP, "test")

        async def new_clients(net: int, n: int) -> int:
            got = [await greet(port, f"127.0.{net}.{i}") for i in range(1, n + 1)]
            held.extend(got)
            return sum(name == bs[1].name for name, _, _ in got)

        early = await new_clients(131, 20)
        assert early <= 6  # without slow start: all 20 (it had 0 connections, the other 40)
        clock.advance(61)
        late = await new_clients(132, 40)
        assert late >= 30  # ramped to its weight: it catches up with the other
        for _, _, w in held:
            w.close()
