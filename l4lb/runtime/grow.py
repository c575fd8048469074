"""A single process upgraded to `workers: M`: it hands itself over as a tree of one worker.

Theory of operation
-------------------
The new process, seeing `workers: M`, runs as a supervisor and says a tree's hello
(workers/upgrade.py). The old process answers as an old supervisor whose only worker is
itself (`into_tree`): its listening sockets (each a reuseport group of one, since
`Listeners.bind_new` binds them so), its admin listener and counters, and one channel to each
new worker; the new supervisor appends M-1 sockets to each group, which nobody steers to
yet. Then the old process runs its own hand-over (runtime/handover.py) to the M new workers
at once, as an old worker does when the number of workers changes: its connections to
worker 0 (which takes its socket), its pins and flows to all, each keeping its share. At the
commit it asks the new supervisor to attach the steering programs (`steer`), and after the
waves it waits for the new supervisor's `serving` (systemd's main process from then on)
before it exits.

A process started before its sockets were so bound (an older l4lb) cannot grow: the new
supervisor's bind of the appended sockets fails, and it says so (the upgrade fails, changing
nothing).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol, cast

from ..dataplane.udp import UdpListener
from ..version import __version__ as VERSION
from .channel import MAX_FDS, Channel, pair
from .errors import UpgradeError
from .handform import TREE
from .listening import Listeners
from .successor import int_or


class Admin(Protocol):
    def listening(self) -> socket.socket | None: ...


async def into_tree(
    tree: Channel,
    hello: dict[str, Any],
    listeners: Listeners,
    admin: Admin | None,
    counters: dict[str, Any],
) -> list[Channel]:
    """Say to the new supervisor what an old one says; one channel to each new worker, the
    first to worker 0 (this process's successor: it takes the sockets)."""
    m = int_or(hello.get("workers"), 1)
    reads = hello.get("reads") or []
    if TREE not in reads or not 2 <= m <= MAX_FDS:
        tree.send({"t": "refused"})
        raise UpgradeError(
            f"the new l4lb ({hello.get('version')}) cannot take one process into {m} workers"
        )
    tree.send({"t": "tree", "format": TREE, "version": VERSION, "workers": 1})
    for spec, srv in list(listeners.serving.values()):
        fd = (
            srv.sock.fileno()
            if isinstance(srv, UdpListener)
            else cast(asyncio.Server, srv).sockets[0].fileno()
        )
        await tree.deliver({"t": "sockets", "where": list(spec.where)}, [fd])
    held = admin.listening() if admin is not None else None
    if held is not None:
        await tree.deliver({"t": "admin"}, [held.fileno()])
        held.close()
    tree.send({"t": "state", "counters": counters, "health": []})
    ends = [pair() for _ in range(m)]
    try:
        await tree.deliver(
            {"t": "workers", "pairs": [[0, j] for j in range(m)]}, [far.fileno() for _, far in ends]
        )
        tree.send({"t": "end"})
        return [Channel(near) for near, _ in ends]
    except BaseException:
        for near, _ in ends:
            near.close()
        raise
    finally:
        for _, far in ends:
            far.close()
