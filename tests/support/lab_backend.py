"""An asyncio backend process for the reliability suite: one port per mode, thousands of
connections without a thread each. Prints 'ready' when bound; runs until stdin closes.

    python -m tests.support.lab_backend --name b1 --echo 127.0.0.1:9001 --stream 127.0.0.1:9002
        --sink 127.0.0.1:9003

- echo: greets with its name and a newline, then echoes;
- stream: reads a decimal byte count and a newline, then sends that many bytes of `pattern()`
  and closes (a download that a client can check byte for byte);
- sink: greets with its name, reads everything slowly (64 KiB every `--sink-pace` seconds),
  and at the client's FIN answers the byte count (an upload into a slow reader);
- udp: answers each datagram with `--udp-answers` datagrams ("NAME i", i from 0), to its
  source (1: an echo of its name; more: a backend whose answers outnumber the queries).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

BLOCK = bytes(range(251)) * 261  # 65,511 bytes: a period that never lines up with buffer sizes


def pattern(offset: int, n: int) -> bytes:
    """Bytes offset .. offset+n of the stream every download carries."""
    start = offset % len(BLOCK)
    out = bytearray()
    while len(out) < n:
        out += BLOCK[start:]
        start = 0
    return bytes(out[:n])


async def greet_and_echo(greeting: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """The echo backend of every test: its greeting, then every byte back, then a clean close
    (the peer's reset or a broken pipe end it quietly). Also tests.support.helpers.NamedBackend's."""
    try:
        w.write(greeting)
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--echo")
    ap.add_argument("--stream")
    ap.add_argument("--sink")
    ap.add_argument("--sink-pace", type=float, default=0.01)
    ap.add_argument("--udp")
    ap.add_argument("--udp-answers", type=int, default=1)
    args = ap.parse_args()
    greeting = f"{args.name}\n".encode()

    class Answers(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, peer: tuple[str, int]) -> None:
            for i in range(args.udp_answers):
                self.transport.sendto(f"{args.name} {i}".encode(), peer)

    async def close(w: asyncio.StreamWriter) -> None:
        w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await greet_and_echo(greeting, r, w)

    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await r.readline()
            total = int(line.strip() or b"0")
            sent = 0
            while sent < total:
                chunk = pattern(sent, min(len(BLOCK), total - sent))
                w.write(chunk)
                sent += len(chunk)
                await w.drain()
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            await close(w)

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = 0
        try:
            w.write(greeting)
            while data := await r.read(65536):
                got += len(data)
                await asyncio.sleep(args.sink_pace)
            w.write(f"{got}\n".encode())
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await close(w)

    servers = []
    for handler, where in ((echo, args.echo), (stream, args.stream), (sink, args.sink)):
        if where:
            host, port = addr(where)
            servers.append(await asyncio.start_server(handler, host, port, backlog=4096))
    loop = asyncio.get_running_loop()
    if args.udp:
        await loop.create_datagram_endpoint(Answers, local_addr=addr(args.udp))
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for srv in servers:
        srv.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
