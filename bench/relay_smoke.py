"""A quick look at the relay's speed and memory, through l4lb and direct, on loopback.

    .venv/bin/python bench/relay_smoke.py [--seconds 5] [--idle 5000]

Starts a uvloop echo/sink backend process and an l4lb process (persistence on), then measures:
new connections per second (connect, 1-byte echo, close; 50 concurrent), bulk throughput (one
connection sending 1 GiB to a sink), and l4lb's RSS per idle proxied connection. Every loop is
bounded in count and time and sends traffic to 127.0.0.1 only. This is a smoke test, not the
side-by-side benchmark against HAProxy and nginx (see the performance issue).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.helpers import free_ports  # noqa: E402
from tests.support.procs import processes, start_l4lb, wait_for_line  # noqa: E402

BACKEND = """
import asyncio, sys, uvloop
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(d)
class Sink(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): pass
    def eof_received(self): self.t.write(b"done"); self.t.close()
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await loop.create_server(Sink, "127.0.0.1", int(sys.argv[2]), backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def conn_rate(port: int, seconds: float, concurrency: int = 50) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x")
            await r.readexactly(1)
            w.close()
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - t0)


async def bulk(port: int, total: int = 1 << 30) -> float:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"\0" * (1 << 20)
    t0 = time.monotonic()
    for _ in range(total // len(chunk)):
        w.write(chunk)
        await w.drain()
    w.write_eof()
    assert await r.read() == b"done"
    w.close()
    return total * 8 / (time.monotonic() - t0) / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_cost(port: int, pid: int, n: int) -> float:
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x")
        await r.readexactly(1)
        conns.append(w)
    per = (rss_kib(pid) - before) / n
    for w in conns:
        w.close()
    return per


async def measure(args: argparse.Namespace, ports: dict[str, int], lb_pid: int) -> None:
    print(f"{'':28}{'direct':>12}{'via l4lb':>12}{'ratio':>8}")
    d = await conn_rate(ports["echo"], args.seconds)
    v = await conn_rate(ports["lb_echo"], args.seconds)
    print(f"{'new connections/s':28}{d:12.0f}{v:12.0f}{v / d:8.2f}")
    d = await bulk(ports["sink"])
    v = await bulk(ports["lb_sink"])
    print(f"{'bulk Gbit/s (1 GiB)':28}{d:12.2f}{v:12.2f}{v / d:8.2f}")
    per = await idle_cost(ports["lb_echo"], lb_pid, args.idle)
    print(f"l4lb RSS per idle connection ({args.idle} open): {per:.1f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument(
        "--checked-backends",
        type=int,
        default=0,
        help="also run a group of N backends with 1 s TCP health checks (their cost on the relay)",
    )
    args = ap.parse_args()
    ports = dict(
        zip(("echo", "sink", "lb_echo", "lb_sink", "lb_checked"), free_ports(5), strict=True)
    )
    with processes() as procs, tempfile.TemporaryDirectory() as tmp:
        be = subprocess.Popen(
            [sys.executable, "-c", BACKEND, str(ports["echo"]), str(ports["sink"])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(be)
        wait_for_line(be, "stdout", "ready")
        cfg = Path(tmp) / "bench.yaml"
        maps = f"{{{ports['lb_echo']}: {ports['echo']}, {ports['lb_sink']}: {ports['sink']}}}"
        cfg.write_text(
            "groups:\n"
            "  bench:\n"
            f"    listen: [127.0.0.1]\n    ports: [{ports['lb_echo']}, {ports['lb_sink']}]\n"
            "    scheduler: wlc\n"
            "    persistence: {timeout: 5m, netmask: /24}\n    backends:\n"
            f"      - {{name: b1, address: 127.0.0.1, ports: {maps}}}\n"
        )
        if args.checked_backends:
            with cfg.open("a") as f:
                f.write(
                    "  checked:\n"
                    f"    listen: [127.0.0.1]\n    ports: [{ports['lb_checked']}]\n"
                    "    health_check: {type: tcp, interval: 1s, timeout: 500ms}\n    backends:\n"
                )
                for i in range(args.checked_backends):
                    f.write(
                        f"      - {{name: c{i}, address: 127.0.0.1, "
                        f"ports: {{{ports['lb_checked']}: {ports['echo']}}}}}\n"
                    )
        lb = start_l4lb(cfg, groups=2 if args.checked_backends else 1)
        procs.append(lb)
        uvloop.run(measure(args, ports, lb.pid))


if __name__ == "__main__":
    main()
