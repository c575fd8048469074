"""A group's `allow` and `deny` lists (issue 25): a refused client's connection is reset and
its datagram dropped, both counted `denied`, before any other work (no affinity entry, no
backend dialled); every other client is served as before. With `accept_proxy`, the address
checked is the one the PROXY header names."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from l4lb.config import ConfigError, load_config_text
from tests.integration.test_udp import Cleanup, shop, shop_yaml, wait_until
from tests.support.helpers import (
    NamedBackend,
    UdpClient,
    config_of,
    free_ports,
    group_yaml,
    hello,
    running,
)


async def refused(port: int, src: str) -> bool:
    """Whether a connection from `src` is reset before any byte comes back."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    except (ConnectionError, OSError):
        return True
    try:
        return await asyncio.wait_for(r.read(100), 5) == b""
    except (ConnectionError, OSError):
        return True
    finally:
        w.close()


@pytest.mark.parametrize(
    ("lists", "denied", "served"),
    [
        ("deny: [127.0.9.0/24]", ["127.0.9.1", "127.0.9.200"], ["127.0.8.1", "127.0.10.1"]),
        ("allow: [127.0.8.0/24, '::1/128']", ["127.0.9.1", "127.0.10.1"], ["127.0.8.1"]),
        (
            "allow: [127.0.0.0/16]\ndeny: [127.0.9.0/24]",  # deny wins
            ["127.0.9.1", "127.1.0.1"],
            ["127.0.8.1"],
        ),
    ],
)
async def test_a_refused_network_gets_neither_connections_nor_flows_nor_entries(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
    cleanup: Cleanup,
    lists: str,
    denied: list[str],
    served: list[str],
) -> None:
    started = await shop(backends, cleanup, n=2)
    _, _, tp, up = started
    async with running(config_of(shop_yaml(started, extra=lists))) as server:
        router = server.routers["shop"]
        table = router.table
        assert table is not None
        for src in served:
            assert await hello(tp, src) in ("b0", "b1")
            assert await cleanup(await UdpClient.open(up, src)).who() in ("b0", "b1")
        for src in denied:
            assert await refused(tp, src), src
            client = cleanup(await UdpClient.open(up, src))
            assert await client.who(within=0.3) is None, src
        stats = server.udp_stats["shop"]
        # each client's connection and flow, each counted once (issue 33: a denied datagram
        # was counted among the failed connections and the dropped datagrams both)
        await wait_until(lambda: router.stats.denied == 2 * len(denied))
        assert "denied" not in stats.drops
        assert stats.opened == len(served)  # no flow for a refused source
        keyed = {router.keyer(src) for src in denied}
        assert not any(table.get(k) for k in keyed)  # no entry made
        assert len(table) == len({router.keyer(src) for src in served})


async def test_behind_a_proxy_the_headers_address_is_checked(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    """The trusted proxy (127.0.0.1) is let in by accept_proxy; its clients by the lists."""
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    group = group_yaml(
        "web",
        [port],
        [b.yaml()],
        extra="accept_proxy: {trusted: [127.0.0.1/32]}\ndeny: [203.0.113.0/24]",
    )
    async with running(config_of(group)) as server:

        async def via_proxy(client: str) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"PROXY TCP4 {client} 127.0.0.1 5555 {port}\r\n".encode())
            try:
                return await asyncio.wait_for(r.readline(), 5)
            except (ConnectionError, OSError):
                return b""
            finally:
                w.close()

        assert await via_proxy("198.51.100.7") == b"b0\n"
        assert await via_proxy("203.0.113.7") == b""
        assert server.routers["web"].stats.denied == 1


def test_lists_are_networks_and_a_bad_one_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(
            "groups:\n  web:\n    ports: [80]\n    deny: [10.0.0.0/8, nonsense]\n"
            "    backends: [{name: a, address: 192.0.2.1}]\n",
            "t.yaml",
        )
    assert str(err.value).splitlines() == [
        "t.yaml:4: groups.web.deny[1]: expected a network such as 10.0.0.0/8, got 'nonsense'"
    ]
