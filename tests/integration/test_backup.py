"""Backup servers (issue 25, HAProxy's `backup`): a backend with `backup: true` gets no new client
while any other backend of the group can take one; when none can, the first backup in the
listed order takes them; when a primary is back, new clients go to it, while the clients pinned
to a backup keep their pin until it expires (or the operator flushes it), as LVS re-pins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from l4lb.core.backends import State
from tests.integration.test_udp import wait_until
from tests.support.helpers import NamedBackend, config_of, free_ports, group_yaml, hello, running


async def test_backups_take_clients_in_order_only_when_no_primary_can(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
) -> None:
    (port,) = free_ports(1)
    p0, p1 = await backends(2, [port], prefix="p")
    k0, k1 = await backends(2, [port], prefix="k")
    listed = [p0.yaml(), k0.yaml().replace("}}", "}, backup: true}"), p1.yaml()]
    listed.append(k1.yaml().replace("}}", "}, backup: true}"))
    check = "health_check: {type: tcp, interval: 0.1s, timeout: 0.5s, rise: 1, fall: 1}"
    config = config_of(group_yaml("web", [port], listed, extra=check))
    async with running(config) as server:
        router = server.routers["web"]
        k0_name, k1_name = router.backups[0].name, router.backups[1].name
        assert [b.name for b in router.backups] == [k0.name, k1.name]
        first = {await hello(port, f"127.0.50.{i}") for i in range(1, 21)}
        assert first == {p0.name, p1.name}  # backups idle while a primary can take clients

        def down(*names: str) -> Callable[[], bool]:
            return lambda: all(router.by_name[n].state is State.DOWN for n in names)

        await p0.stop()
        await p1.stop()
        await wait_until(down(p0.name, p1.name))
        fallen = {await hello(port, f"127.0.51.{i}") for i in range(1, 11)}
        assert fallen == {k0_name}  # the first backup only, not both
        assert await hello(port, "127.0.50.1") == k0_name  # pinned to a dead primary: re-pinned

        await k0.stop()
        await wait_until(down(k0.name))
        assert {await hello(port, f"127.0.52.{i}") for i in range(1, 6)} == {k1_name}

        await p0.restart()
        await wait_until(lambda: router.by_name[p0.name].state is State.UP)
        assert {await hello(port, f"127.0.53.{i}") for i in range(1, 6)} == {p0.name}
        assert await hello(port, "127.0.52.1") == k1_name  # its pin on the backup is kept
