"""systemd's readiness protocol (sd_notify): one datagram of text lines to the Unix socket that
NOTIFY_SOCKET names (a leading `@`: the abstract namespace). No library: it is one sendto.

l4lb sends READY=1 once every listener is bound (with workers: once every worker is ready),
RELOADING=1 (with MONOTONIC_USEC, as systemd 253 wants for Type=notify-reload) then READY=1
around a reload, STOPPING=1 when it begins to shut down, and STATUS= lines a person can read in
`systemctl status`. Without NOTIFY_SOCKET, nothing is sent. A failure to send is logged once
and never stops the balancer.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("l4lb.sdnotify")

_warned = False


def notify(*fields: str) -> bool:
    """Send `fields` (`READY=1`, `STATUS=...`) as one datagram; False when not sent."""
    global _warned
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    data = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, address)
    except OSError as exc:
        if not _warned:
            _warned = True
            log.warning("cannot notify systemd at %s: %s", path, exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=shutting down: draining connections")
