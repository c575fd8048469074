"""A shared store that lies: something on the Redis port that answers every command with an
integer, or announces a reply of 300 MB. Neither may cost a client its connection or put a
traceback in the log: the store goes down, the consistent hash takes the new clients, one
throttled line says so, and nothing of the lie is read past its announced length."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator, Callable

import pytest

from tests.support.helpers import config_of, free_ports, group_yaml, hello, running


def commands(buf: bytearray) -> list[list[bytes]]:
    """The complete RESP commands at the start of `buf` (taken out of it)."""
    out = []
    while True:
        try:
            end = buf.index(b"\r\n")
            n = int(buf[1:end])
            at, args = end + 2, []
            for _ in range(n):
                e = buf.index(b"\r\n", at)
                size = int(buf[at + 1 : e])
                if len(buf) < e + 2 + size + 2:
                    raise ValueError
                args.append(bytes(buf[e + 2 : e + 2 + size]))
                at = e + 2 + size + 2
        except ValueError:
            return out
        del buf[:at]
        out.append(args)


@contextlib.asynccontextmanager
async def liar(port: int, answer: Callable[[list[bytes]], bytes]) -> AsyncIterator[list[bytes]]:
    """A server on `port` that speaks RESP and answers each command with `answer(command)`;
    yields the names of the commands it was sent."""
    seen: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                buf += data
                for cmd in commands(buf):
                    seen.append(cmd[0].upper())
                    w.write(answer(cmd))
                await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield seen
    finally:
        server.close()


def integers(cmd: list[bytes]) -> bytes:
    return b":1\r\n"


def huge(cmd: list[bytes]) -> bytes:
    """A claim answered with 300 MB announced (and 4 MB of it sent), anything else an OK."""
    if cmd[0].upper() in (b"EVALSHA", b"EVAL"):
        return b"$314572800\r\n" + b"x" * (4 << 20)
    return b"+OK\r\n"


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
