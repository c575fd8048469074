"""Upgrades that lose nothing: the running l4lb starts the l4lb installed now, on the
configuration file as it is now, and hands it everything it serves, then exits.

Theory of operation
-------------------
The old process (`Upgrade.run`, on SIGUSR2, `l4lb ctl upgrade` or `POST /api/v1/upgrade`):

1. starts `python -m l4lb run ... --takeover-fd N`, with one end of a SOCK_SEQPACKET pair;
   its standard error goes to a file until it speaks (so that an import error of the new code
   can be said in one line), then to the old process's own.
2. waits for its `hello` (it loaded and checked the configuration; an error is its one line),
   and writes the newest hand-over format both read (`handform.WRITES`, `READS`).
3. stops accepting (the listening sockets stay open: the kernel queues what arrives, nobody is
   refused) and lets the dials in flight finish (`transfer.Freezer.settle`); the flows stop.
4. sends the listening sockets, the pins (the state file's lines, from memory), the backends'
   states, the counters, every flow with its descriptor, and `end`.
5. waits for `adopted`, then sends `commit`; the new process serves the listeners and flows
   and answers `serving`. New clients have waited since 3 (tens of milliseconds); the open
   connections have not waited at all.
6. moves the open connections in waves of `WAVE` (format 2): each wave frozen
   (`Freezer.freeze_wave`: stopped reading, flushed), sent with its descriptors, adopted by the
   new process (which answers `took`), then released here (this process's copies closed, no
   callback run). A connection pauses for its own wave alone (tens of milliseconds), whatever
   the number of connections; the others relay on meanwhile. Then `done`, with what this
   process counted since 4, and it exits (`os._exit`: nothing closed, shut down or reset).
   To a new process that reads only format 1 (the previous release), the connections are
   frozen all at once in 3 and sent in 4, before the commit.

Anything that fails before `serving` (the new process exits, stalls past `TIMEOUT`, refuses a
record) thaws the old process: it accepts again, its connections read again, the new process
is killed. Nothing was read from any socket by the new process before `commit`. A failure
during the waves (the new process gone) does the same for what has not moved yet.

A worker whose tree changes its number of workers hands over to several new workers at once
(workers/upgrade.py): each step above is said to all of them (`others`) and waits for all;
the listeners, connections and counters go to its successor alone. A new worker so fed
(`Takeover` with a `Share`) receives from every old worker at once and keeps its own pins and
flows; a flow it does not keep but whose client may still queue on a socket it serves is kept
as an alias until `RETIRE` (`UdpListener.aliases`), so that no second flow is opened for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from ..core.flowstats import UdpStats
from ..core.reuseport import serving
from ..core.routing import Router
from ..dataplane.listeners import Where
from ..dataplane.relay import ClientSide
from ..dataplane.transfer import FreezeError, Freezer, adopt_all, export_conn, export_flow
from ..dataplane.udp import UdpListener
from ..version import __version__ as VERSION
from . import carried, grow, sdnotify
from . import pins as pinfile
from .channel import Channel
from .errors import AsTree, UpgradeError
from .handform import READS, WAVES, WRITES, HandoverError, check_conn, check_flow
from .listening import Listeners
from .sharing import Share, each_or_first_error
from .successor import (
    changing_workers,
    expect,
    int_or,
    kill_started,
    start_successor,
)


class HeldListener(Protocol):
    """The admin API's listener, as an upgrade hands it over (`runtime.server.AdminPlane`)."""

    def listening(self) -> socket.socket | None: ...

    def pause(self) -> None: ...

    async def resume(self) -> None: ...


class Runtime(carried.Counted, Protocol):
    """What an upgrade reads and sets of the process it runs in (`runtime.server.Runtime`)."""

    listeners: Listeners

    def admin_plane(self) -> HeldListener | None: ...


log = logging.getLogger("l4lb.upgrade")
TIMEOUT = 30.0  # seconds for the new process to start and take everything
FREEZE = 3.0  # seconds for every connection to flush what l4lb holds
BATCH = 100  # records a message (two descriptors each: under SCM_MAX_FD)
WAVE = BATCH  # connections frozen and moved at once, after the commit (one message)
PINS_BYTES = 96 << 10  # pin lines a message, about


def handed_over() -> None:
    """The new process serves everything: this one goes, closing nothing (its descriptors
    are copies; no FIN, no reset), running no shutdown (which would drain and save)."""
    logging.shutdown()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


class Upgrade:
    """One upgrade, seen from the process that gives everything away."""

    def __init__(
        self,
        runtime: Runtime,
        argv: list[str],
        *,
        workers: int = 1,
        channel: Channel | None = None,
        others: Sequence[Channel] = (),
        barrier: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.argv = argv
        self.workers = workers  # (the new process must run as many: `changing_workers`)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0  # the new process's, as its hello says
        # A worker's upgrade (workers/upgrade.py): its successor's channel, made by the
        # supervisors, and what to wait for before the commit (every worker ready to commit)
        self.channel: Channel | None = channel
        # With workers whose number changes: the other new workers, given the pins and flows
        # too (each keeps its own share); the connections and counters go to `channel` alone
        self.others = list(others)
        self.tree: Channel | None = None  # a single process growing into workers: runtime/grow.py
        self.barrier = barrier
        self.freezer: Freezer | None = None
        self.stopped: list[tuple[Any, socket.socket]] = []  # TCP listeners stopped: (spec, dup)
        self.admin_stopped = False
        self.committed = False  # the new process said `serving`: the waves are under way
        self.tables: list[Any] = []  # marked for what changes during the hand-over
        # The new process's stderr until it speaks (closed in `_undo`, or with this process)
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115

    async def run(self) -> str:
        """Hand everything over; what moved, in one line. UpgradeError: it did not happen."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                moved = await self._run()
        except Exception as exc:  # whatever it was, the old process serves on
            if isinstance(exc, TimeoutError):
                why = f"the new process did not take over within {TIMEOUT:g} s"
            elif isinstance(exc, UpgradeError | HandoverError | FreezeError | OSError):
                why = str(exc)
            else:  # a bug of ours: said whole, once
                log.exception("the upgrade failed unexpectedly")
                why = f"{type(exc).__name__}: {exc}"
            if self.committed:
                why = f"{why}; during the waves: what it served went with it, this one serves on"
            await self._undo()
            raise UpgradeError(why) from None
        took = time.monotonic() - t0
        return f"handed over {moved} in {took * 1000:.0f} ms"

    async def _run(self) -> str:
        runtime = self.runtime
        channel, fmt = await self._start()
        await self._pins_while_serving(channel, fmt)
        self.freezer = freezer = Freezer(runtime.plane, runtime.listeners.udp_listeners())
        frozen_at = time.monotonic()
        listeners = self._stop_accepting()
        waves = fmt >= WAVES
        if waves:  # the dials finish; the connections move after the commit, a wave at a time
            await freezer.settle(FREEZE)
            freezer.stop_udp()
            conns = []
        else:
            conns = await freezer.freeze(FREEZE)
        timing = {"flushed": time.monotonic() - frozen_at}
        await self._send_listeners(listeners)
        pins = await self._send_pins(self.tables)
        timing["pins"] = time.monotonic() - frozen_at
        self._send_all({"t": "backends", "states": carried.states(runtime.routers)})
        counted = carried.counters(runtime)
        channel.send({"t": "counters", "counters": counted})
        n_conns = await self._send_conns(conns)
        n_flows = await self._send_flows()
        timing["sent"] = time.monotonic() - frozen_at
        self._send_all({"t": "end"})
        await self._expect_all("adopted")
        timing["adopted"] = time.monotonic() - frozen_at
        admin = runtime.admin_plane()
        if admin is not None:
            admin.pause()
            self.admin_stopped = True
        if self.barrier is not None:
            await self.barrier()
        self._send_all({"t": "commit"})
        await self._expect_all("serving")
        self.committed = True
        timing["serving"] = time.monotonic() - frozen_at
        steps = ("flushing", "pins", "records", "adoption", "serving")
        marks = [timing["flushed"], timing["pins"], timing["sent"], timing["adopted"]]
        marks.append(timing["serving"])
        took = ", ".join(
            f"{what} {(y - x) * 1000:.0f}"
            for what, x, y in zip(steps, [0.0, *marks[:-1]], marks, strict=True)
        )
        paused = f"clients paused {timing['serving'] * 1000:.0f} ms: {took}"
        if waves:
            n_conns, worst = await self._send_waves()
            since = carried.delta(counted, carried.counters(runtime))
            channel.send({"t": "done", "counters": since})
            for other in self.others:
                other.send({"t": "done", "counters": {}})
            over = (time.monotonic() - frozen_at - timing["serving"]) * 1000
            paused = (
                f"{paused}; then the connections in waves over {over:.0f} ms, each paused"
                f" {worst * 1000:.0f} ms at most"
            )
        if self.tree is not None:  # (systemd's main process is the new supervisor from here)
            await self._expect(self.tree, "serving")
        return (
            f"{len(listeners)} listeners, {n_conns:,} connections, {n_flows:,} flows,"
            f" {pins:,} pins to process {self.pid} ({paused})"
        )

    async def _start(self) -> tuple[Channel, int]:
        """The new process started (or, for a worker, its successor reached through the
        supervisor), and its hello heard: the channel, and the format to write (the newest
        both read)."""
        if self.channel is None:
            self.proc, self.channel = await start_successor(self.argv, self.errors)
        channel = self.channel
        hellos = await self._expect_all("hello")
        hello = hellos[0]
        self.pid = int_or(hello.get("pid"), 0)  # (growing into workers: the supervisor's)
        if hello.get("tree") and self.barrier is None:  # a single process into workers
            await self._grow(hello)
            channel = self.channel
            hellos = await self._expect_all("hello")
            hello = hellos[0]
        theirs = int_or(hello.get("workers"), 1)
        if theirs != self.workers:
            self._send_all({"t": "refused"})
            raise UpgradeError(changing_workers(self.workers, theirs))
        both = list(WRITES)
        for h in hellos:
            reads = h.get("reads", [])
            both = [f for f in both if isinstance(reads, list) and f in reads]
        if not both:
            self._send_all({"t": "refused"})
            raise UpgradeError(
                f"the new l4lb ({hello.get('version')}) reads hand-over formats"
                f" {hello.get('reads')}, this one writes {list(WRITES)}"
            )
        return channel, max(both)

    async def _grow(self, hello: dict[str, Any]) -> None:
        """Hand this process over as a tree of one worker (runtime/grow.py): from here on,
        `channel` and `others` are the new workers', and the commit waits for the steering."""
        assert self.channel is not None
        self.tree = tree = self.channel
        rt = self.runtime
        said = {"reloads_ok": rt.reloads_ok, "reloads_failed": rt.reloads_failed,
                "started_at": rt.started_at, "upgrades": dict(rt.upgrades)}  # fmt: skip
        chans = await grow.into_tree(tree, hello, rt.listeners, rt.admin_plane(), said)
        self.channel, self.others = chans[0], chans[1:]
        self.workers = len(chans)

        async def steer() -> None:
            tree.send({"t": "steer"})
            await self._expect(tree, "steered")

        self.barrier = steer

    async def _pins_while_serving(self, channel: Channel, fmt: int) -> None:
        """The pins while serving (a million take seconds to walk): after the freeze, only what
        changed since goes (`AffinityTable.ordered_since`), a newer file the new one prefers."""
        runtime = self.runtime
        self.tables = tables = [r.table for r in runtime.routers.values() if r.table is not None]
        for table in tables:
            table.mark()
        try:
            base = await pinfile.snapshot(runtime.routers)
        except BaseException:
            for table in tables:
                table.unmark()
            raise
        self._send_all({"t": "begin", "format": fmt, "version": VERSION})
        await self._expect_all("ready")
        await self._send_part(0, base)  # parsed there while this process still serves:
        self._send_all({"t": "pins-done"})
        await self._expect_all("parsed")

    async def _send_waves(self) -> tuple[int, float]:
        """After the commit (the new process serves the listeners): the connections, `WAVE` at
        a time, each wave frozen, sent, adopted there and released here before the next, so
        that a connection pauses for its own wave alone. How many moved; the longest wave."""
        assert self.channel is not None and self.freezer is not None
        plane = self.runtime.plane
        todo = [c for c in plane.live if isinstance(c, ClientSide)]  # (none comes anew)
        moved, worst = 0, 0.0
        for i in range(0, len(todo), WAVE):
            t0 = time.monotonic()
            conns = await self.freezer.freeze_wave(todo[i : i + WAVE], FREEZE)
            if not conns:
                continue
            await self._send_conns(conns)
            await self._expect(self.channel, "took")
            self.freezer.release(conns)
            moved += len(conns)
            worst = max(worst, time.monotonic() - t0)
        return moved, worst

    async def _expect(self, channel: Channel, kind: str) -> dict[str, Any]:
        started = self.tree is None or channel is self.tree  # (else a new supervisor's worker)
        return await expect(channel, kind, self.proc if started else None, self.errors)

    def _all(self) -> list[Channel]:
        assert self.channel is not None
        return [self.channel, *self.others]

    def _send_all(self, message: dict[str, Any]) -> None:
        for channel in self._all():
            channel.send(message)

    async def _deliver_all(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        for channel in self._all():
            await channel.deliver(message, fds)

    async def _expect_all(self, kind: str) -> list[dict[str, Any]]:
        """Each successor's answer, in order (the first failure is the upgrade's)."""
        return await each_or_first_error([self._expect(c, kind) for c in self._all()])

    def _stop_accepting(self) -> list[tuple[Any, socket.socket]]:
        """Stop accepting on every TCP listener (each socket kept open, duplicated: the kernel
        queues new clients meanwhile); the UDP ones stop reading with the freeze."""
        out = []
        for spec, srv in list(self.runtime.listeners.serving.values()):
            if isinstance(srv, UdpListener):
                out.append((spec, socket.socket(fileno=os.dup(srv.sock.fileno()))))
                continue
            sock = cast(asyncio.Server, srv).sockets[0]
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            srv.close()
            self.stopped.append((spec, dup))
            out.append((spec, dup))
        return out

    async def _send_listeners(self, listeners: list[tuple[Any, socket.socket]]) -> None:
        assert self.channel is not None
        items = [{"group": s.group, "host": s.host, "port": s.port, "proto": s.proto}
                 for s, _ in listeners]  # fmt: skip
        fds = [sock.fileno() for _, sock in listeners]
        admin = self.runtime.admin_plane() if self.tree is None else None  # (the supervisor's)
        admin_sock = admin.listening() if admin is not None else None
        if admin_sock is not None:
            items.append({"admin": True})
            fds.append(admin_sock.fileno())
        await self.channel.deliver({"t": "listeners", "items": items}, fds)
        for spec, sock in listeners:
            if spec.proto == "udp":
                sock.close()  # (the UDP listener keeps its own)
        if admin_sock is not None:
            admin_sock.close()

    async def _send_part(self, part: int, pins: tuple[dict[str, Any], list[str]]) -> None:
        """One of the two files of pins: the snapshot taken while serving (0), what changed
        since (1, once frozen); the new process prefers the second."""
        assert self.channel is not None
        header, lines = pins
        await self._deliver_all({"t": "pins", "part": part, "header": header, "lines": []})
        batch: list[str] = []
        size = 0
        for line in lines:
            batch.append(line)
            size += len(line)
            if size >= PINS_BYTES:
                await self._deliver_all({"t": "pins", "part": part, "lines": batch})
                batch, size = [], 0
        if batch:
            await self._deliver_all({"t": "pins", "part": part, "lines": batch})

    async def _send_pins(self, tables: list[Any]) -> int:
        """What changed since the snapshot (frozen: nothing more changes); the pins, counted."""
        delta = await pinfile.snapshot(self.runtime.routers, since_mark=True)
        for table in tables:
            table.unmark()
        await self._send_part(1, delta)
        count = 0
        for router in self.runtime.routers.values():
            if router.table is not None:
                count += len(router.table)
        return count

    async def _send_conns(self, conns: list[Any]) -> int:
        assert self.channel is not None and self.freezer is not None
        now = self.runtime.plane.loop.time()
        sent = 0
        for i in range(0, len(conns), BATCH):
            records, fds = [], []
            for cs in conns[i : i + BATCH]:
                record, two = export_conn(cs, (b"", b""), now)  # (flushed: nothing held)
                records.append(record)
                fds += two
            await self.channel.deliver({"t": "conns", "items": records}, fds)
            sent += len(records)
        return sent

    async def _send_flows(self) -> int:
        assert self.channel is not None
        now = self.runtime.plane.loop.time()
        records, fds = [], []
        sent = 0
        for listener in self.runtime.listeners.udp_listeners():
            for flow in list(listener.flows.values()):
                if flow.sock is None or flow.backend is None:
                    continue  # (being routed: it opens again at its next datagram)
                record, one = export_flow(listener, flow, now)
                records.append(record)
                fds += one
                if len(records) >= BATCH:
                    await self._deliver_all({"t": "flows", "items": records}, fds)
                    sent += len(records)
                    records, fds = [], []
        if records:
            await self._deliver_all({"t": "flows", "items": records}, fds)
            sent += len(records)
        return sent

    async def _undo(self) -> None:
        """The upgrade failed: the new process killed, everything as it was."""
        for table in self.tables:
            table.unmark()
        await kill_started(self.proc)
        if self.channel is not None:
            self.channel.close()
        for other in self.others:
            other.close()
        if self.tree is not None:
            self.tree.close()
        if self.stopped:
            await self.runtime.listeners.serve(self.stopped)
            self.stopped = []
        if self.freezer is not None:
            self.freezer.thaw()
        if self.admin_stopped:
            admin = self.runtime.admin_plane()
            if admin is not None:
                await admin.resume()
        if self.committed:  # (the new process had told systemd it was the main one)
            sdnotify.notify(f"MAINPID={os.getpid()}")
        self.errors.close()


# ---------------------------------------------------------------------- the new process


class Takeover:
    """What the new process received, before it serves (`Runtime.start` asks it): from the
    previous process, or, for a worker whose number of siblings changed, from each old worker
    (`share`)."""

    def __init__(self, channels: Channel | Sequence[Channel], share: Share | None = None) -> None:
        self.channels = [channels] if isinstance(channels, Channel) else list(channels)
        self.share = share
        self.listeners: dict[Where, socket.socket] = {}
        # Old workers' sockets served here for a while: (where, old worker's index) -> socket
        self.retiring: dict[tuple[Where, int], socket.socket] = {}
        self.admin: socket.socket | None = None
        self.pins: list[pinfile.StateFile] = []  # newest first
        self.states: dict[str, Any] = {}
        self.counters: list[dict[str, Any]] = []  # each old process's that sent them
        self.conns: list[tuple[dict[str, Any], tuple[socket.socket, socket.socket]]] = []
        self.flows: list[tuple[dict[str, Any], socket.socket, int]] = []  # (record, sock, source)
        self.began = 0.0
        self.waves = False  # the connections come after the commit (`follow`)

    def _source(self, k: int) -> int:
        return self.share.sources[k] if self.share is not None else 0

    def fail(self, why: str) -> None:
        for channel in self.channels:
            channel.send({"t": "error", "why": why})

    async def receive(self, routers: Mapping[str, Router], workers: int = 1) -> None:
        """Everything the old process sends, checked, until `end`. HandoverError when anything
        is amiss (the old process serves on). `workers`: how many this process's tree runs."""
        hello = {"t": "hello", "pid": os.getpid(), "version": VERSION, "reads": list(READS)}
        for channel in self.channels:  # (`grows`: can run as a tree of one, for an old tree)
            channel.send({**hello, "workers": workers, "grows": self.share is None})
        self.began = time.monotonic()
        got = await each_or_first_error(
            [self._receive_from(k, c, routers) for k, c in enumerate(self.channels)]
        )
        for pins in got:
            self.pins += pins

    async def _receive_from(
        self, k: int, channel: Channel, routers: Mapping[str, Router]
    ) -> list[pinfile.StateFile]:
        begin = await self._next(channel, "begin", "as-tree")
        if begin.get("t") == "as-tree":  # (an old tree: cli.py starts a supervisor instead)
            raise AsTree()
        if begin.get("format") not in READS:
            raise HandoverError(f"unknown hand-over format {str(begin.get('format'))[:20]}")
        self.waves = begin["format"] >= WAVES
        channel.send({"t": "ready"})
        headers: dict[int, dict[str, Any]] = {}
        lines: dict[int, list[bytes]] = {}
        parsed: dict[int, pinfile.StateFile] = {}
        while True:
            got = await channel.recv()
            if got is None:
                raise HandoverError("the old process went away mid-hand-over")
            message, fds = got
            kind = message.get("t")
            if kind == "listeners":
                self._listeners(message, fds, self._source(k))
            elif kind == "pins":
                part = 1 if message.get("part") == 1 else 0
                if isinstance(message.get("header"), dict):
                    headers[part] = message["header"]
                lines.setdefault(part, []).extend(str(x).encode() for x in message.get("lines", []))
            elif kind == "pins-done":  # the snapshot is whole: parsed before the freeze
                if 0 in headers:
                    parsed[0] = self._parse(headers[0], lines.pop(0, []))
                channel.send({"t": "parsed"})
            elif kind == "backends":
                self.states = message.get("states") or {}
            elif kind == "counters":
                self.counters.append(message.get("counters") or {})
            elif kind == "conns":
                self.conns += _checked_conns(message, fds, routers)
            elif kind == "flows":
                self._flows(message, fds, routers, self._source(k))
            elif kind == "end":
                break
            else:
                raise HandoverError(f"an unexpected message {str(kind)[:40]!r}")
        out = []
        for part in (1, 0):  # the changes since the snapshot first: they win
            if part in parsed:
                out.append(parsed[part])
            elif part in headers:
                out.append(self._parse(headers[part], lines.get(part, [])))
        return out

    async def commit(self) -> None:
        """Say `adopted` (this process is ready to serve) and wait for the old one's `commit`."""
        if os.environ.get("L4LB_TEST_HANDOVER_STOP") == "adopted":  # (tests: a kill mid-way)
            os.kill(os.getpid(), signal.SIGSTOP)
        for channel in self.channels:
            channel.send({"t": "adopted", "conns": len(self.conns), "flows": len(self.flows)})
        for channel in self.channels:  # (every old process commits at once: the supervisor's)
            await self._next(channel, "commit")

    @staticmethod
    def _parse(header: dict[str, Any], lines: list[bytes]) -> pinfile.StateFile:
        raw = b"\n".join([pinfile.json_line(header), *lines])
        return pinfile.parse(raw, "the previous process")

    @staticmethod
    async def _next(channel: Channel, kind: str, other: str = "") -> dict[str, Any]:
        got = await channel.recv()
        if got is None:
            raise HandoverError("the old process went away mid-hand-over")
        message, fds = got
        for fd in fds:
            os.close(fd)
        if message.get("t") not in (kind, other or kind):
            raise HandoverError(f"expected {kind}, got {str(message.get('t'))[:40]!r}")
        return message

    def _listeners(self, message: dict[str, Any], fds: list[int], source: int) -> None:
        items = message.get("items", [])
        if len(items) != len(fds):
            raise HandoverError("listeners and descriptors do not match")
        share = self.share
        for item, fd in zip(items, fds, strict=True):
            sock = socket.socket(fileno=fd)
            if item.get("admin"):
                self.admin = sock
                continue
            where = (str(item["host"]), int(item["port"]), str(item["proto"]))
            if share is not None and source >= share.workers:  # a socket that retires
                self.retiring[(where, source)] = sock
            elif share is not None and where in self.listeners:
                sock.close()
            else:
                self.listeners[where] = sock

    async def follow(self, runtime: Runtime) -> None:
        """After `serving`, in a hand-over in waves: the connections of each old process."""
        await asyncio.gather(*(self._follow(runtime, c) for c in self.channels))

    async def _follow(self, runtime: Runtime, channel: Channel) -> None:
        """Each wave of connections adopted as it comes (`took` said), then the counters the
        old process counted meanwhile, added."""
        t0, n = time.monotonic(), 0
        why = ""
        while True:
            got = await channel.recv()
            if got is None:
                why = "the previous process went away before it had handed over every connection"
                break
            message, fds = got
            kind = message.get("t")
            if kind == "conns" and os.environ.get("L4LB_TEST_HANDOVER_STOP") == "wave":
                os.kill(os.getpid(), signal.SIGSTOP)  # (tests: a kill during the waves)
            if kind == "done":
                carried.apply_counters(runtime, message.get("counters") or {}, add=True)
                break
            try:
                if kind != "conns":
                    raise HandoverError(f"an unexpected message {str(kind)[:40]!r}")
                conns = _checked_conns(message, fds, runtime.routers)
            except HandoverError as exc:
                for fd in fds:
                    os.close(fd)
                why = str(exc)
                channel.send({"t": "error", "why": why})
                break
            await adopt_all(runtime.plane, runtime.routers, conns, "upgrade")
            n += len(conns)
            channel.send({"t": "took", "n": len(conns)})
        channel.close()
        took = (time.monotonic() - t0) * 1000
        if why:
            log.warning("upgrade: %s (%d connections taken over)", why, n)
        elif n or len(self.channels) == 1:
            log.info("upgrade: took over %d connections in waves in %.0f ms", n, took)

    def _flows(
        self,
        message: dict[str, Any],
        fds: list[int],
        routers: Mapping[str, Router],
        source: int,
    ) -> None:
        items = message.get("items", [])
        if len(fds) != len(items):
            raise HandoverError("flows and descriptors do not match")
        for raw, fd in zip(items, fds, strict=True):
            self.flows.append((check_flow(raw, routers), socket.socket(fileno=fd), source))

    def _place(
        self,
        runtime: Runtime,
        listener: UdpListener,
        *,
        binding: tuple[Router, int, UdpStats],
        record: dict[str, Any],
        sock: socket.socket,
        source: int,
    ) -> bool:
        """A flow adopted here (True), or, when the number of workers changed, kept as an
        alias where its client's datagrams may still queue (the socket of `source`, if this
        worker serves it: see `UdpListener.aliases`), or closed (another worker's copy)."""
        share = self.share
        if share is None:
            listener.adopt(binding, record, sock)
            return True
        where = (str(record["listener"][0]), int(record["listener"][1]), "udp")
        retiring = runtime.listeners.retiring.get((where, source))
        old = retiring if isinstance(retiring, UdpListener) else None
        mine = serving(source, share.workers) == share.me  # (its client may queue here)
        if not share.keeps_flow(binding[0].name, record["key"], source):
            if mine:
                (old or listener).alias(record, sock)
                runtime.listeners.settling = True
            else:
                sock.close()
            return False
        listener.adopt(binding, record, sock)
        if old is not None and mine:  # (kept here; its client may queue on the old socket)
            old.alias(record, socket.socket(fileno=os.dup(sock.fileno())))
            runtime.listeners.settling = True
        return True

    async def adopt(self, runtime: Runtime) -> str:
        """After `commit`: the backends' states, the counters, every connection and flow
        adopted; `serving` said. What came, in one line."""
        carried.apply_states(runtime.routers, self.states)
        for i, counters in enumerate(self.counters):  # (several old workers': added up)
            carried.apply_counters(runtime, counters, add=i > 0)
        runtime.upgrades["ok"] += 1
        await adopt_all(runtime.plane, runtime.routers, self.conns, "upgrade")
        by_where = {(x.spec.host, x.spec.port): x for x in runtime.listeners.udp_listeners()}
        n_flows = 0
        for record, sock, source in self.flows:
            listener = by_where.get(tuple(record["listener"][:2]))
            binding = runtime.listeners.udp_binding(listener.spec) if listener else None
            if listener is None or binding is None or record["backend"] not in binding[0].by_name:
                sock.close()  # its port or backend is gone in this configuration
                continue
            if self._place(
                runtime, listener, binding=binding, record=record, sock=sock, source=source
            ):
                n_flows += 1
        # systemd follows this process from here on (NotifyAccess=all): said before the old
        # one is told, so that it never sees its main process gone
        sdnotify.notify(f"MAINPID={os.getpid()}")
        for channel in self.channels:
            channel.send({"t": "serving"})
        took = (time.monotonic() - self.began) * 1000
        return f"took over {len(self.conns):,} connections and {n_flows:,} flows in {took:.0f} ms"


def _checked_conns(
    message: dict[str, Any], fds: list[int], routers: Mapping[str, Router]
) -> list[tuple[dict[str, Any], tuple[socket.socket, socket.socket]]]:
    items = message.get("items", [])
    if not isinstance(items, list) or len(fds) != 2 * len(items):
        raise HandoverError("connections and descriptors do not match")
    socks = [socket.socket(fileno=fd) for fd in fds]
    out = []
    for i, raw in enumerate(items):
        out.append((check_conn(raw, routers), (socks[2 * i], socks[2 * i + 1])))
    return out
