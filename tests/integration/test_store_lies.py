"""A shared store that lies: something on the Redis port that answers every command with an
integer, or announces a reply of 300 MB. Neither may cost a client its connection or put a
traceback in the log: the store goes down, the consistent hash takes the new clients, one
throttled line says so, and nothing of the lie is read past its announced length."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

import pytest

from tests.support.helpers import config_of, free_ports, group_yaml, hello, running
from tests.support.hostile import huge, integers, liar


@pytest.mark.parametrize("answer", [integers, huge], ids=["integers", "300MB"])
async def test_a_lying_store_costs_no_client_and_logs_no_traceback(
    backends, caplog: pytest.LogCaptureFixture, answer: Callable[[list[bytes]], bytes]
) -> None:
    port, store = free_ports(2)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml() for b in bs], netmask="/24"),
        top=f"affinity_store: {{url: 'redis://127.0.0.1:{store}', budget: 50ms}}\n",
    )
    caplog.set_level(logging.INFO)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with liar(store, answer) as seen, running(cfg) as server:
        assert server.store is not None
        served = [await hello(port, f"127.0.{i}.1") for i in range(1, 41)]
        assert len(served) == 40 and set(served) <= {b.name for b in bs}
        again = [await hello(port, f"127.0.{i}.1") for i in range(1, 41)]
        assert again == served  # pinned locally, each /24 on its backend
        assert not server.store.up and server.store.stats.errors >= 1
        assert server.store.stats.fallbacks >= 1
        assert seen  # it was asked
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 100_000, f"{grown} KiB"  # not the 300 MB it announced
    assert "Traceback" not in caplog.text
    downs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert 1 <= len(downs) <= 3, [r.getMessage() for r in downs]  # said, and throttled
