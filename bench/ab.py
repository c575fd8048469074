"""A/B of two l4lb configurations' CPU per new connection, finely interleaved: both run at once
on the proxy core, and the load (wrk, `Connection: close`) alternates between them in short
slices, so that the machine's drift (other tenants, frequency) hits both alike. Each slice's
CPU per connection comes from /proc; the result is the median of the paired ratios B/A.

    .venv/bin/python bench/ab.py [--slices 30] [--seconds 1] [--variant log|limits]

A: one group, persistence on (make bench's l4lb); B: the same with the connection log (JSON to
a file) or with client_limits. Everything on 127.0.0.1; every process started is ended.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import PROXY_CORE, Bench, cpu_seconds, free_ports  # noqa: E402
from tests.procs import wait_port  # noqa: E402

EXTRA = {
    "log": ("access_log: {{path: {tmp}/access.log, format: json}}\n", ""),
    "limits": ("", "    client_limits: {max_conns: 100, rate: 100000/s}\n"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--variant", choices=sorted(EXTRA), default="log")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4lb-ab-") as tmp:
        bench = Bench(Path(tmp), args.seconds)
        try:
            bench.start_backends()
            pa, pb = free_ports(2)
            a = start(bench, pa, "", "")
            b = start(bench, pb, *EXTRA[args.variant])
            per: dict[str, list[float]] = {"A": [], "B": []}
            for i in range(args.slices):
                for name, port, pid in (("A", pa, a), ("B", pb, b))[:: 1 if i % 2 else -1]:
                    c0 = cpu_seconds([pid])
                    out = bench.wrk(port, close=True)
                    per[name].append((cpu_seconds([pid]) - c0) / max(1, out["requests"]) * 1e6)
        finally:
            bench.stop_all()
    ratios = [y / x for x, y in zip(per["A"], per["B"], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(
        f"A (l4lb) {statistics.median(per['A']):.1f} us, B (+{args.variant})"
        f" {statistics.median(per['B']):.1f} us of CPU per new connection (medians of"
        f" {args.slices} slices of {args.seconds:g} s)\npaired B/A: median {statistics.median(ratios):.3f},"
        f" quartiles {q[0]:.3f}-{q[2]:.3f}"
    )  # fmt: skip


if __name__ == "__main__":
    main()
