"""Peers that lie, shared by the tests and the reliability suite: a fake Redis that answers
what no Redis would, and state files no l4lb wrote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any


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


def saved(entries: list[Any], **top: Any) -> str:
    """A state file of group `web` (/24, IPv6 /128) holding `entries`, `top` replacing its keys."""
    doc: dict[str, Any] = {"version": 1, "saved_at": time.time(), "groups": {}}
    doc["groups"]["web"] = {"netmask": 0xFFFFFF00, "ipv6_prefix": 128, "entries": entries}
    doc.update(top)
    return json.dumps(doc)


GOOD = [(127 << 24) + (9 << 8), "a", 60.0]  # 127.0.9.0/24 on backend a, a minute left
CORRUPT_STATE = {
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "a 5,000-digit key": saved([["K", "a", 60]]).replace('"K"', "9" * 5000),
    "a backend name that is a list": saved([[1, ["a"], 60], GOOD]),
    "saved_at yesterday": saved([GOOD], saved_at="yesterday"),
    "keys out of range": saved([[-1, "a", 60], [2**40, "a", 60], [2**200, "a", 60], GOOD]),
    "NaN time left": saved([GOOD]).replace("60.0", "NaN"),
    "Infinity time left": saved([[1 << 8, "a", 0.5], GOOD]).replace("0.5", "Infinity"),
    "bytes": "\x00\xff\xfe garbage",
    "not a list of entries": saved([]).replace('"entries": []', '"entries": {"x": 1}'),
    "true as a key": saved([[True, "a", 60], GOOD]),
}
