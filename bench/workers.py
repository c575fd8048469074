"""`make bench-workers`: how l4lb's throughput scales with `workers: N` on this machine, beside
HAProxy with as many threads.

    .venv/bin/python bench/workers.py [--rounds N] [--seconds S]

Same backends as `make bench` (an nginx with two HTTP servers). Nothing is pinned to a core
here: the proxy may use every core, and shares them with wrk (two threads) and the backends,
which is what a 2-core machine can honestly show. The group has no persistence, so the kernel's
4-tuple hash spreads wrk's connections (all from 127.0.0.1) over the workers; with persistence
they would all be one client, and one worker's, by design. Every process is ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, Bench, Proxy, bench_env, cpu_seconds, haproxy_head

ALL_CORES = ",".join(str(c) for c in range(os.cpu_count() or 1))


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def start_l4lb(bench: Bench, workers: int) -> Proxy:
    conf = bench.tmp / f"l4lb-w{workers}.yaml"
    conf.write_text(f"""
workers: {workers}
groups:
  web:
    listen: [127.0.0.1]
    ports: [{bench.l_http}]
    scheduler: rr
    persistence: {{timeout: 0}}
    backends:
      - {{name: b1, address: 127.0.0.1, ports: {{{bench.l_http}: {bench.b1}}}}}
      - {{name: b2, address: 127.0.0.1, ports: {{{bench.l_http}: {bench.b2}}}}}
""")
    p = bench.spawn(
        [sys.executable, "-m", "l4lb", "--log-level", "warning", "run", "-c", str(conf)],
        ALL_CORES,
    )
    from tests.support.procs import wait_port

    wait_port(bench.l_http)
    time.sleep(1.0 if workers > 1 else 0.2)  # the port answers once the supervisor binds it
    pids = [p.pid, *children(p.pid)]
    return Proxy(f"l4lb workers={workers}", bench.l_http, bench.l_bulk, pids)


def start_haproxy(bench: Bench, threads: int) -> Proxy:
    conf = bench.tmp / f"haproxy-t{threads}.cfg"
    conf.write_text(
        haproxy_head(threads)
        + f"""
frontend web1
  bind 127.0.0.1:{bench.h_http} backlog 4096
  default_backend web
backend web
  balance roundrobin
  server b1 127.0.0.1:{bench.b1}
  server b2 127.0.0.1:{bench.b2}
"""
    )
    p = bench.spawn(["haproxy", "-db", "-f", str(conf)], ALL_CORES)
    from tests.support.procs import wait_port

    wait_port(bench.h_http)
    return Proxy(f"haproxy nbthread={threads}", bench.h_http, bench.h_bulk, [p.pid])


def wrk2(bench: Bench, port: int, close: bool) -> float:
    """Requests per second with two wrk threads (the load needs the whole machine too)."""
    import re

    argv = ["wrk", "-t2", "-c100", f"-d{bench.seconds:g}s", f"http://127.0.0.1:{port}/"]
    if close:
        argv[4:4] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=bench.seconds + 30).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    targets = {
        "l4lb workers=1": lambda b: start_l4lb(b, 1),
        "l4lb workers=2": lambda b: start_l4lb(b, 2),
        "haproxy nbthread=1": lambda b: start_haproxy(b, 1),
        "haproxy nbthread=2": lambda b: start_haproxy(b, 2),
    }
    results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    with bench_env(args.seconds) as bench:
        for r in range(args.rounds):
            for name, start in targets.items():
                print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                proxy = start(bench)
                try:
                    c0 = cpu_seconds(proxy.pids)
                    conn = wrk2(bench, proxy.http, close=True)
                    c1 = cpu_seconds(proxy.pids)
                    keep = wrk2(bench, proxy.http, close=False)
                    results[name].append({"conn_per_s": conn, "req_per_s": keep, "cpu_s": c1 - c0})
                finally:
                    bench.stop(proxy)
    print(f"{'':22}{'new conn/s':>14}{'keepalive req/s':>18}{'proxy CPU s (conn run)':>24}")
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{name:22}{med['conn_per_s']:>14,.0f}{med['req_per_s']:>18,.0f}{med['cpu_s']:>24.1f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rounds": args.rounds, "seconds": args.seconds, "results": results}))
    print(f"\n{args.rounds} round(s) of {args.seconds:g} s, medians; {os.cpu_count()} cores shared")
    print(f"with wrk and the backends. Raw: {out.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
