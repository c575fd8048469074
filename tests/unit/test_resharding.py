"""An upgrade that changes the number of workers from N to M: which new worker keeps which pin
and flow (pure logic: the kernel's steering computed as the program does)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from l4lb.config import load_config_text
from l4lb.core.keys import V6_TAG
from l4lb.core.reuseport import serving, steer
from l4lb.core.routing import Router
from l4lb.core.spec import Config
from l4lb.runtime.pins import Pins, steering
from l4lb.runtime.sharing import Share

CHANGES = [(2, 3), (3, 2), (4, 2), (2, 5), (5, 3)]


def config(workers: int, persistence: bool = True) -> Config:
    keyed = "    persistence: {timeout: %s, netmask: /24}\n" % ("60s" if persistence else "0")
    return load_config_text(
        f"workers: {workers}\ngroups:\n  web:\n    ports: [80, 443]\n{keyed}"
        "    backends:\n      - {name: a, address: 10.0.0.1}\n"
    )


def keys(n: int = 2000) -> list[int]:
    """Masked client keys as the tables hold them: IPv4 /24s and some IPv6 ones."""
    rng = random.Random(7)
    out = [rng.getrandbits(24) << 8 for _ in range(n)]
    out += [V6_TAG | rng.getrandbits(128) for _ in range(n // 10)]
    return out


def packed(key: int) -> bytes:
    return (key ^ V6_TAG).to_bytes(16, "big") if key & V6_TAG else key.to_bytes(4, "big")


def test_a_retiring_socket_is_served_by_one_new_worker() -> None:
    assert [serving(i, 3) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [serving(i, 5) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize(("before", "after"), CHANGES)
def test_every_pin_goes_where_its_clients_will_be_accepted(before: int, after: int) -> None:
    """Each key is kept by the worker the new program steers it to (its clients' future), and
    by the one that serves the socket the old program steered it to (a client queued there at
    the switch): never lost, never by a third worker."""
    cfg = config(after)
    routers = {g.name: Router(g, lambda: 0.0) for g in cfg.groups}
    keeps = [Pins(routers, me).resharded(cfg, before) for me in range(after)]
    mask, v6 = 0xFFFFFF00, 128
    for key in keys():
        now = steer(packed(key), mask, v6, after)
        was = serving(steer(packed(key), mask, v6, before), after)
        holders = {me for me in range(after) if keeps[me]("web", key)}
        assert holders == {now, was}, (hex(key), holders, now, was)


@pytest.mark.parametrize(("before", "after"), CHANGES)
def test_every_flow_is_adopted_by_exactly_one_new_worker(before: int, after: int) -> None:
    """Every old worker hands every new one each flow (a copy of its socket); one keeps it:
    the worker its client is steered to now (a group the kernel hashes: the old socket's)."""
    for persistence in (True, False):
        cfg = config(after, persistence)
        to = steering(cfg)
        shares = [
            Share(me, after, list(range(before)), lambda g, k: True, to) for me in range(after)
        ]
        for key in keys(300):
            source = to("web", key, before) if persistence else key % before
            assert source is not None or not persistence
            kept = [s.me for s in shares if s.keeps_flow("web", key, source or 0)]
            assert len(kept) == 1, (hex(key), kept)
            if persistence:
                assert kept == [to("web", key, after)]


def test_a_group_without_persistence_is_not_steered() -> None:
    to = steering(config(2, persistence=False))
    assert to("web", int(ipaddress.ip_address("192.0.2.0")), 2) is None
