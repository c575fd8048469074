"""Byte-exact relaying with random sizes, random chunking and half-close in either order."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb import Server
from l4lb.dataplane import splice
from tests.support.helpers import config_of, free_ports, group_yaml

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i : i + n])
        i += n
    if i < len(data):
        out.append(data[i:])
    return out


async def scenario(
    up: bytes,
    down: bytes,
    up_sizes: list[int],
    down_sizes: list[int],
    backend_first: bool,
    relay: str = "copy",
) -> None:
    got_up = asyncio.get_running_loop().create_future()

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for c in chunks(down, down_sizes):
                w.write(c)
                await w.drain()
            w.write_eof()

        if backend_first:  # the backend finishes its direction while the client still sends
            await send()
            got_up.set_result(await r.read())
        else:
            got_up.set_result(await r.read())
            await send()
        w.close()

    srv = await asyncio.start_server(backend, "127.0.0.1", 0)
    bport = srv.sockets[0].getsockname()[1]
    (port,) = free_ports(1)
    cfg = config_of(
        group_yaml(
            "g",
            [port],
            [f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}"],
            extra=f"relay: {relay}",
        )
    )
    server = Server(cfg)
    await server.start()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def client_send() -> None:
            for c in chunks(up, up_sizes):
                w.write(c)
                await w.drain()
            w.write_eof()

        if backend_first:
            got_down = await r.read()
            await client_send()
        else:
            await client_send()
            got_down = await r.read()
        assert got_down == down
        assert await asyncio.wait_for(got_up, 10) == up
    finally:
        w.close()
        await server.shutdown(grace=0)
        srv.close()


sizes = st.lists(st.integers(1, 300_000), max_size=8)


@pytest.mark.parametrize("relay", ["copy", "splice", "auto"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    up_len=st.integers(0, 1_500_000),
    down_len=st.integers(0, 1_500_000),
    up_sizes=sizes,
    down_sizes=sizes,
    backend_first=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_bytes_arrive_exactly_both_ways(
    relay: str,
    loop: str,
    up_len: int,
    down_len: int,
    up_sizes: list[int],
    down_sizes: list[int],
    backend_first: bool,
    seed: int,
) -> None:
    """copy: the Protocol relay; splice: zero copy from the first byte; auto: the switch from one
    to the other in mid-stream (after 64 KiB here), which must not lose or reorder a byte."""
    rnd = random.Random(seed)
    up, down = rnd.randbytes(up_len), rnd.randbytes(down_len)
    saved = splice.SPLICE_AFTER
    splice.SPLICE_AFTER = 64 * 1024
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(
                asyncio.wait_for(scenario(up, down, up_sizes, down_sizes, backend_first, relay), 60)
            )
    finally:
        splice.SPLICE_AFTER = saved


@pytest.mark.parametrize("relay", ["splice", "auto"])
def test_sixteen_mib_each_way_through_the_zero_copy_path(relay: str) -> None:
    up, down = os.urandom(16 << 20), os.urandom(16 << 20)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            asyncio.wait_for(scenario(up, down, [65536] * 4, [1 << 20] * 4, False, relay), 60)
        )
