"""What the shared store adds to a new client's first connection, and to a known client's.

    .venv/bin/python bench/store_latency.py [--clients 2000]

Starts a redis-server of its own on a free loopback port, and a balancer in this process (uvloop)
in front of an echo backend, once with `affinity_store` and once without; N new clients (each
its own /24 of 127.0.0.0/8) connect one after the other, then connect again (now known), and the
time from connect() to the backend's first byte is reported (median and p99). Everything is on
loopback; the processes started here are ended by their PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from l4lb import Server
from l4lb.config import load_config_text
from tests.support.helpers import free_ports
from tests.support.procs import redis_argv, wait_for_line


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(b"hi\n")
    await w.drain()
    w.close()


async def measure(text: str, port: int, sources: list[str]) -> tuple[list[float], list[float]]:
    server = Server(load_config_text(text))
    await server.start()
    try:
        rounds: list[list[float]] = []
        for _ in range(2):  # new clients, then the same clients again
            times = []
            for src in sources:
                t0 = time.perf_counter()
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
                await r.readline()
                times.append(time.perf_counter() - t0)
                w.close()
            rounds.append(times)
        return rounds[0], rounds[1]
    finally:
        await server.shutdown(1.0)


def line(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return (
        f"{label:34} median {statistics.median(ms):.3f} ms   p99 {ms[int(len(ms) * 0.99)]:.3f} ms"
    )


async def main(clients: int, redis_port: int) -> None:
    lb, backend = free_ports(2)
    srv = await asyncio.start_server(echo, "127.0.0.1", backend)
    sources = [f"127.{1 + i // 256}.{i % 256}.1" for i in range(clients)]
    group = f"""groups:
  web:
    listen: [127.0.0.1]
    ports: [{lb}]
    scheduler: rr
    persistence: {{timeout: 5m, netmask: /24}}
    backends: [{{name: b, address: 127.0.0.1, ports: {{{lb}: {backend}}}}}]
"""
    store = (
        f"affinity_store: {{type: redis, url: 'redis://127.0.0.1:{redis_port}/0', "
        f"key_prefix: 'bench{time.time_ns()}:'}}\n"
    )
    for label, text in (
        ("local table only", group),
        ("with affinity_store (Redis)", store + group),
    ):
        new, known = await measure(text, lb, sources)
        print(line(f"{label}, new clients", new))
        print(line(f"{label}, known clients", known))
    srv.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2000)
    args = ap.parse_args()
    port = free_ports(1)[0]
    redis = subprocess.Popen(
        redis_argv(port),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(redis, "stdout", "Ready to accept connections")
        uvloop.run(main(args.clients, port))
    finally:
        redis.terminate()
        redis.wait(10)
