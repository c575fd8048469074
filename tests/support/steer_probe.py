"""Run inside a network namespace by test_workers: IPv6 clients from many /48 prefixes (the
test adds fd00:0:N::1 and fd00:0:N:1::2 to lo) connect to a reuseport group on [::] with the
steering program; prints how many were queued on another socket than `steer` says, as JSON."""

from __future__ import annotations

import ipaddress
import json
import socket
import sys

from tests.integration.test_workers import MASK24, accepted_by, reuseport_group, steer

PREFIXES = int(sys.argv[1])
result = {}
for n in (2, 3):
    socks = reuseport_group(socket.AF_INET6, "::", 8080 + n, n)
    wrong, counts = 0, [0] * n
    try:
        for p in range(PREFIXES):
            want = steer(ipaddress.ip_address(f"fd00:0:{p:x}::").packed, MASK24, 48, n)
            for src in (f"fd00:0:{p:x}::1", f"fd00:0:{p:x}:1::2"):  # one /48, two /64s
                got = accepted_by(socks, src, "::1", 8080 + n)
                counts[got] += 1
                wrong += got != want
    finally:
        for s in socks:
            s.close()
    result[n] = {"wrong": wrong, "counts": counts}
print(json.dumps(result))
