"""A/B of two l4lb configurations' cost per new connection, measured both at once: A and B
run side by side on the proxy core, and two wrk (`Connection: close`, 50 connections each)
load them at the same time. The kernel shares the core between them, so each gets the same
CPU time, and the ratio of their new connections per second is the inverse ratio of what a
connection costs each; drift (other tenants, frequency) hits both alike. Measured one after
the other, the same two configurations differ by 10-20% from run to run on this machine; side
by side, by 1-2%.

    .venv/bin/python bench/ab.py [--rounds 6] [--seconds 5] [--variant log|limits|same]

A: one group, persistence on (make bench's l4lb); B: the same with the connection log (JSON
to a file), with client_limits, or unchanged (`same`: the method's own spread). `make bench`
runs `log` and `same`. Everything on 127.0.0.1; every process started is ended.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import LOAD_CORE, PROXY_CORE, Bench, free_ports  # noqa: E402
from tests.support.procs import wait_port  # noqa: E402

EXTRA = {
    "log": ("access_log: {{path: {tmp}/access.log, format: json}}\n", ""),
    "limits": ("", "    client_limits: {max_conns: 100, rate: 100000/s}\n"),
    "same": ("", ""),
}


def start(bench: Bench, port: int, top: str, group: str) -> int:
    conf = bench.tmp / f"l4lb-{port}.yaml"
    conf.write_text(
        top.format(tmp=bench.tmp)
        + f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
        "    scheduler: rr\n    persistence: {timeout: 5m}\n"
        + group
        + f"    backends:\n      - {{name: b1, address: 127.0.0.1, ports: {{{port}: {bench.b1}}}}}\n"
        f"      - {{name: b2, address: 127.0.0.1, ports: {{{port}: {bench.b2}}}}}\n"
    )
    p = bench.spawn(
        [sys.executable, "-m", "l4lb", "--log-level", "warning", "run", "-c", str(conf)],
        PROXY_CORE,
    )
    wait_port(port)
    return p.pid


def _connections(port: int, seconds: float) -> int:
    out = subprocess.run(
        [
            *("taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c50", f"-d{seconds:g}s"),
            *("--timeout", "5s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    m = re.search(r"(\d+) requests in", out)
    if m is None:
        raise RuntimeError(f"wrk on port {port} printed no count: {out.strip()[-300:]!r}")
    return int(m.group(1))


def side_by_side(bench: Bench, variant: str, rounds: int, seconds: float) -> dict[str, object]:
    """`rounds` runs of both at once; B's new connections over A's, per round."""
    pa, pb = free_ports(2)
    pids = [start(bench, pa, "", ""), start(bench, pb, *EXTRA[variant])]
    ratios: list[float] = []
    counts: list[tuple[int, int]] = []
    try:
        for r in range(rounds):
            got: dict[int, int] = {}

            def load(port: int, got: dict[int, int] = got) -> None:
                got[port] = _connections(port, seconds)

            order = (pa, pb) if r % 2 == 0 else (pb, pa)  # which wrk starts first, alternating
            threads = [threading.Thread(target=load, args=(p,)) for p in order]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            counts.append((got[pa], got[pb]))
            ratios.append(got[pb] / got[pa])
    finally:
        bench.stop_pids(pids)
    return {"variant": variant, "ratios": ratios, "counts": counts}


def summary(result: dict[str, object]) -> str:
    ratios = result["ratios"]
    assert isinstance(ratios, list)
    return f"{statistics.median(ratios):.3f}x (min-max {min(ratios):.3f}-{max(ratios):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--variant", choices=sorted(EXTRA), default="log")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4lb-ab-") as tmp:
        bench = Bench(Path(tmp), args.seconds)
        try:
            bench.start_backends()
            result = side_by_side(bench, args.variant, args.rounds, args.seconds)
        finally:
            bench.stop_all()
    print(
        f"B (+{args.variant}) / A (l4lb): new connections per second side by side, median of"
        f" {args.rounds} rounds of {args.seconds:g} s: {summary(result)}"
    )


if __name__ == "__main__":
    main()
