"""Instructions per connection, counted by callgrind: repeatable where `make bench` on a shared
2-core machine moves by 20% from run to run. Each variant runs twice under
`valgrind --tool=callgrind`, with a few connections and with many, and the difference over the
difference in connections is what one connection costs: start-up cancels out.

    .venv/bin/python bench/conn_instructions.py [--connections 1000] [--variant plain ...]

What is counted: one process holding l4lb (on uvloop), its backend (an asyncio server) and a
client making sequential connections from 200 loopback addresses (persistence /24), so a figure
is the whole loopback connection, client and backend included; compare variants, not with other
proxies. Variants: `plain`, `limits` (client_limits max_conns and rate), `log` (the connection
log, JSON to a file; its writes are batched by time, which under callgrind's slowness flushes
more often than for real). `--proxy-only` counts the l4lb process alone, as `l4lb run`, with
the client and the backend in another process: what a connection costs the balancer itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "bare": "",  # bench/bare_relay.py instead of l4lb (--proxy-only): the loop's own cost
    "plain": "",  # the build `make native` made (compiled where it can be)
    "pure": "",  # plain, as pure Python (L4LB_PURE=1): the two builds side by side
    "limits": "    client_limits: {{max_conns: 100, rate: 100000/s}}\n",
    "log": "access_log: {{path: {tmp}/access.log, format: json}}\n",
}


async def run(n: int, extra: str, tmp: str) -> None:
    sys.path.insert(0, str(ROOT))
    from l4lb import Server
    from l4lb.config import load_config_text

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi\n")
        await w.drain()
        await r.read(10)
        w.close()

    backend = await asyncio.start_server(handle, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    top = extra if extra.startswith("access_log") else ""
    group = extra if not top else ""
    text = (
        top.format(tmp=tmp)
        + "groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [47001]\n"
        + "    persistence: {timeout: 5m, netmask: /24}\n"
        + group.format()
        + "    backends:\n"
        + f"      - {{name: a, address: 127.0.0.1, ports: {{47001: {bport}}}}}\n"
        + f"      - {{name: b, address: 127.0.0.1, ports: {{47001: {bport}}}}}\n"
    )
    server = Server(load_config_text(text))
    await server.start()
    for i in range(n):
        r, w = await asyncio.open_connection(
            "127.0.0.1", 47001, local_addr=(f"127.0.{i % 200}.1", 0)
        )
        await r.readline()
        w.close()
        await r.read()
    await asyncio.wait_for(server.wait_quiet(), 10)
    await server.shutdown(grace=0.1)
    backend.close()


def build_env(variant: str) -> dict[str, str]:
    return {**os.environ, "L4LB_PURE": "1"} if variant == "pure" else dict(os.environ)


def count(variant: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--inner",
                variant,
                str(n),
                tmp,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
            env=build_env(variant),
        )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise SystemExit(f"callgrind said nothing: {out.stderr[-500:]}")
    return int(m.group(1))


PEER = """
import asyncio, sys, uvloop
async def main(port, bport, n):
    async def handle(r, w):
        w.write(b"hi\\n"); await w.drain(); await r.read(10); w.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", bport)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.{i % 200}.1", 0))
        await r.readline(); w.close(); await r.read()
    print("done", flush=True)
    srv.close()
uvloop.run(main(*map(int, sys.argv[1:])))
"""


def count_proxy(variant: str, n: int) -> int:
    """The l4lb process alone under callgrind; its client and backend run outside it."""
    import signal
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        socks = [socket.socket() for _ in range(2)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        port, bport = (s.getsockname()[1] for s in socks)
        for s in socks:
            s.close()
        extra = VARIANTS[variant]
        top = extra.format(tmp=tmp) if extra.startswith("access_log") else ""
        group = extra.format() if not top else ""
        cfg = Path(tmp) / "l4lb.yaml"
        cfg.write_text(
            top + f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
            "    persistence: {timeout: 5m, netmask: /24}\n"
            + group
            + f"    backends: [{{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}]\n"
        )
        peer = subprocess.Popen(
            [sys.executable, "-c", PEER, str(port), str(bport), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # (its handlers' cancels at the end are no news)
            text=True,
        )
        assert peer.stdout is not None and peer.stdin is not None
        peer.stdout.readline()
        target = (
            [str(ROOT / "bench" / "bare_relay.py"), f"{port}:{bport}"]
            if variant == "bare"
            else ["-m", "l4lb", "--log-level", "warning", "run", "-c", str(cfg)]
        )
        lb = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={os.environ.get('CALLGRIND_OUT', '/dev/null')}",
                sys.executable,
                *target,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env=build_env(variant),
        )
        for _ in range(600):  # under valgrind, l4lb takes a while to listen
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            import time

            time.sleep(0.1)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        peer.stdout.readline()
        peer.wait(60)
        lb.send_signal(signal.SIGINT)
        _, err = lb.communicate(timeout=120)
    m = re.search(r"Collected : (\d+)", err)
    if m is None:
        raise SystemExit(f"callgrind said nothing: {err[-500:]}")
    return int(m.group(1))


def per_connection(variant: str, n: int, counter: Callable[[str, int], int] | None = None) -> float:
    """Instructions one connection costs: the difference of a run of `n` and a run of none."""
    counter = counter or count_proxy
    return (counter(variant, n) - counter(variant, 0)) / n


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        import uvloop

        _, _, variant, n, tmp = sys.argv
        uvloop.run(run(int(n), VARIANTS[variant], tmp))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument(
        "--proxy-only",
        action="store_true",
        help="count the l4lb process alone (client and backend in another process)",
    )
    args = ap.parse_args()
    counter = count_proxy if args.proxy_only else count
    base = None
    variants = args.variant or ["plain", "limits", "log"]
    if "bare" in variants and not args.proxy_only:
        raise SystemExit("the bare relay is measured as a process of its own: add --proxy-only")
    for variant in variants:
        per = per_connection(variant, args.connections, counter)
        base = base or per
        print(f"{variant:7} {per:10,.0f} instructions per connection ({per / base - 1:+.1%})")


if __name__ == "__main__":
    main()
