"""An upgrade at scale: l4lb with N open connections (10,000 by default) and a table of M pins
(1,000,000) gets SIGUSR2; what is measured: the hand-over's time (the old process's line), the
longest echo round trip of a connection probed every 5 ms meanwhile (the relay's stall), whether
every open connection still echoes afterwards, and the RSS of the process before and after.

    .venv/bin/python bench/upgrade_bench.py [--conns 10000] [--pins 1000000]

Each connection is two descriptors in l4lb: with a hard RLIMIT_NOFILE under 2N + 1000, N is
lowered to fit (and said).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from table_scale import write_state  # noqa: E402

ECHO = """
import asyncio, sys, uvloop
async def h(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main(ports):
    for p in ports:
        await asyncio.start_server(h, "127.0.0.1", p, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main([int(x) for x in sys.argv[1:]]))
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Log:
    """The l4lb process's stderr, read in a thread (its lines kept)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def wait_for(self, needle: str, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines:
                if needle in line:
                    return line
            time.sleep(0.05)
        raise TimeoutError(f"no {needle!r} in l4lb's log")


async def load(port: int, n: int, lb: subprocess.Popen[str]) -> dict[str, float]:
    conns = []
    for i in range(n):
        src = f"127.1.{i // 250}.{i % 250 + 1}"
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        w.write(b"x\n")
        await r.readline()
        conns.append((r, w))
    probe_r, probe_w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.2.0.1", 0))
    worst = 0.0
    upgraded = False
    stop = time.monotonic() + 1e9
    seq = 0
    while time.monotonic() < stop:
        t0 = time.monotonic()
        probe_w.write(b"%d\n" % seq)
        got = await asyncio.wait_for(probe_r.readline(), 30)
        assert got == b"%d\n" % seq, got
        seq += 1
        if upgraded:
            worst = max(worst, time.monotonic() - t0)
        if not upgraded and seq == 20:
            lb.send_signal(signal.SIGUSR2)
            upgraded = True
            stop = time.monotonic() + 10.0  # the probe runs on through the hand-over
        await asyncio.sleep(0.005)
    alive = 0
    for _, w in conns:  # every handed-over connection still echoes
        w.write(b"y\n")
    for r, _ in conns:
        if await asyncio.wait_for(r.readline(), 30) == b"y\n":
            alive += 1
    return {"worst_stall_ms": worst * 1000, "alive": alive}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=10_000)
    ap.add_argument("--pins", type=int, default=1_000_000)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if 2 * args.conns + 1000 > hard:  # (raising the hard limit needs CAP_SYS_RESOURCE)
        args.conns = (hard - 1000) // 2
        print(f"RLIMIT_NOFILE's hard limit is {hard}: {args.conns:,} connections", flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="l4lb-upgrade-bench-") as tmp:
        port, b1, b2 = free_ports(3)
        write_state(Path(tmp) / "pins.json", args.pins)
        cfg = Path(tmp) / "l4lb.yaml"
        cfg.write_text(
            f"state_file: '{tmp}/pins.json'\nstate_interval: 1h\ngroups:\n  web:\n"
            f"    listen: ['127.0.0.1']\n    ports: [{port}]\n"
            f"    persistence: {{timeout: 1h, netmask: /24, max_entries: {args.pins * 2}}}\n"
            f"    backends:\n      - {{name: b1, address: 127.0.0.1, ports: {{{port}: {b1}}}}}\n"
            f"      - {{name: b2, address: 127.0.0.1, ports: {{{port}: {b2}}}}}\n"
        )
        echo = subprocess.Popen(
            [sys.executable, "-c", ECHO, str(b1), str(b2)], stdout=subprocess.PIPE, text=True
        )
        lb = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "-c", str(cfg)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        log = Log(lb)
        new = 0
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            log.wait_for("restored")
            before = rss_kib(lb.pid)
            out = asyncio.run(load(port, args.conns, lb))
            lb.wait(60)
            line = log.wait_for("handed over")
            new = int(re.search(r"to process (\d+)", line).group(1))  # type: ignore[union-attr]
            after = rss_kib(new)
        finally:
            for p in (lb, echo):
                if p.poll() is None:
                    p.terminate()
            if new:
                os.kill(new, signal.SIGTERM)
    print(line.split("upgrade: ", 1)[-1])
    print(
        f"{args.conns:,} connections, {args.pins:,} pins: longest echo stall"
        f" {out['worst_stall_ms']:.0f} ms; {out['alive']:,} of {args.conns:,} connections echo"
        f" after; RSS {before // 1024} MiB before, {after // 1024} MiB after (one process)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
