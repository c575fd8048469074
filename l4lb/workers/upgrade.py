"""Upgrades of `workers: N`: the whole tree replaced, each worker handing over to its successor.

Theory of operation
-------------------
Why the whole tree and not worker by worker under the old supervisor: the supervisor is code
too (it would stay old), and "no old process left" holds only if it goes. Why each worker to
its own successor: a worker's clients are the ones the kernel steers to its socket of each
reuseport group, and its pins and flows are theirs; worker i's successor serves the same
socket i (the supervisors pass the very sockets on), so every pin, flow and connection stays
with the socket its clients reach.

The old supervisor (`TreeUpgrade.run`), on SIGUSR2, `l4lb ctl upgrade` or the API:

1. starts the new l4lb as a single process's upgrade does (`handover.start_successor`); it
   loads the configuration, sees `workers: M`, runs as a supervisor and says `hello`.
2. sends it every listening socket (N a port, in the group's order), the admin listener,
   what it counted and the checks' verdicts, and the far ends of socket pairs from old
   workers to new ones; `end`.
3. the new supervisor binds any new port, and starts worker j with its pairs' ends. The old
   supervisor gives each of its workers the near ends (`upgrade`); each runs a single
   process's hand-over (runtime/handover.py) up to the commit, and says `upgrade-adopted`.
4. once every worker has, the old supervisor says `steer`: the new supervisor attaches the
   steering programs of its configuration (`steered`); then it stops its admin listener and
   says `upgrade-commit` to all: the new workers serve (and say `ready` to their supervisor,
   which becomes systemd's main process and says `serving`); the connections move in waves.
   If any worker cannot hand over before that, all are told `upgrade-abort`: they thaw and
   serve on, the new tree is killed (its programs replaced by this tree's), nothing changed.
5. each old worker exits once its waves are done; the old supervisor waits for them and
   exits. A new worker that dies during its waves leaves its predecessor serving what had not
   moved: that one is told to stop accepting and drain (SIGTERM, up to shutdown_timeout), and
   the old supervisor waits for it before it goes.

With M == N the pairs are i -> i. When the number changes (N -> M), every old worker is
paired with every new one: its connections and counters go to the new worker that serves its
socket (`reuseport.serving`: i itself, or i mod M for a socket that retires), and every new
worker is given all its pins and flows, keeping its share (`sharing.Share`: the
clients the new program steers to it, and for the pins also those queued on a socket it
serves at the switch). The group grows by sockets appended at N..M-1, which the old program
(mod N) never picks; it shrinks by the new workers serving sockets M..N-1 for `RETIRE`
seconds after the commit (what queued or was mid-handshake there is accepted, not reset),
the program (mod M) sending nothing new there. The switch itself is one setsockopt, made
while every old worker has stopped accepting and no new one has started: nobody serves by
the wrong program. A group without persistence (the kernel's own hash) is held to the first
sockets by the client's address while the number changes, and given its hash back after.
One process growing into workers plays both old parts itself (runtime/grow.py); a new process
whose configuration says `workers: 1` answers a single process's hello (`grows`), is told
`as-tree`, and runs as a supervisor of one worker, so that the tree's sockets stay a group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.reuseport import serving
from ..core.spec import Config
from ..dataplane.listeners import ListenSpec, Where, close_all, listen_specs
from ..runtime import sdnotify
from ..runtime.channel import MAX_FDS, Channel, pair
from ..runtime.errors import StartupError, UpgradeError
from ..runtime.handform import TREE, TREE_READS
from ..runtime.handover import TIMEOUT, HeldListener
from ..runtime.successor import (
    changing_workers,
    expect,
    kill_started,
    start_successor,
    upgrade_argv,
)
from ..version import __version__ as VERSION

log = logging.getLogger("l4lb.upgrade")
MAX_PAIRS = 1024  # channels from old workers to new ones (N x M when the number changes)
SUPERVISOR_COUNTERS = ("restarts", "reloads_ok", "reloads_failed", "started_at")


class WorkerProc(Protocol):
    """A worker as an upgrade sees it (`supervisor.WorkerProc`)."""

    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    upgrade_replies: asyncio.Queue[dict[str, Any]]
    listened: asyncio.Event


class Supervisor(Protocol):
    """The supervisor as an upgrade reads and sets it (`supervisor.Supervisor`)."""

    n: int
    config: Config
    sockets: dict[Where, tuple[ListenSpec, list[socket.socket]]]
    health: dict[tuple[str, str], dict[str, Any]]
    restarts: int
    restarts_by: dict[str, int]
    reloads_ok: int
    reloads_failed: int
    started_at: float
    upgrades: dict[str, int]
    admin_refused: dict[str, int]

    @property
    def workers(self) -> Sequence[WorkerProc | None]: ...

    def steer(self) -> None: ...

    def unhold_hashed(self) -> None: ...

    @property
    def front(self) -> HeldListener | None: ...


class TreeUpgrade:
    """One upgrade of the whole tree, seen from the old supervisor."""

    def __init__(self, sup: Supervisor, channel: Channel | None = None) -> None:
        self.sup = sup
        self.proc: asyncio.subprocess.Process | None = None
        # Given: a new supervisor that asked (`--take-over`), not started here
        self.channel: Channel | None = channel
        self.pid = 0
        self.asked: list[WorkerProc] = []  # the workers told `upgrade`
        self.ended: set[int] = set()  # those that said how their part ended (or exited)
        self.committed = False
        self.steered = False  # the new tree's steering programs were attached
        self.resized = False  # the new tree runs another number of workers
        self.admin_paused = False
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115  (the new process's stderr)

    async def run(self) -> str:
        try:
            return await self._run()
        finally:
            self.errors.close()

    async def _run(self) -> str:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._until_commit()
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                why = f"the new tree did not take over within {TIMEOUT:g} s"
            elif isinstance(exc, UpgradeError | OSError):
                why = str(exc)
            else:
                log.exception("the upgrade failed unexpectedly")
                why = f"{type(exc).__name__}: {exc}"
            await self._undo()
            raise UpgradeError(why) from None
        lines = await self._after_commit()
        took = (time.monotonic() - t0) * 1000
        pid = self.pid
        return f"handed over {self.sup.n} workers to process {pid} in {took:.0f} ms: " + "; ".join(
            lines
        )

    async def _until_commit(self) -> None:
        sup = self.sup
        if self.channel is None:
            self.proc, self.channel = await start_successor(upgrade_argv(), self.errors)
        hello = await self._expect("hello")
        if not hello.get("tree") and hello.get("grows"):  # one process: it runs as a tree of one
            self.channel.send({"t": "as-tree"})
            hello = await self._expect("hello")
        pid = hello.get("pid")
        self.pid = pid if isinstance(pid, int) else 0
        fmt, m = self._agree(hello)
        self.resized = m != sup.n
        await self._send_state(fmt)
        # One pair from each old worker to each new one it hands over to: its successor
        # (`serving`: the connections and counters go there) and, if the number changes,
        # every other (each takes its share of the pins and flows)
        pairs = [
            (i, j) for i in range(sup.n) for j in range(m) if (m != sup.n or i == j)
        ]  # fmt: skip
        made = {p: pair() for p in pairs}
        try:
            for k in range(0, len(pairs), MAX_FDS):
                some = pairs[k : k + MAX_FDS]
                await self.channel.deliver(
                    {"t": "workers", "pairs": [list(p) for p in some]},
                    [made[p][1].fileno() for p in some],
                )
            self.channel.send({"t": "end"})
            for w in list(sup.workers):
                if w is None or w.channel.closed:
                    raise UpgradeError("a worker is restarting: try again in a moment")
                while not w.upgrade_replies.empty():  # (a previous, failed upgrade's)
                    w.upgrade_replies.get_nowait()
                first = serving(w.index, m)
                to = [first] + [j for i, j in pairs if i == w.index and j != first]
                fds = [made[(w.index, j)][0].fileno() for j in to]
                w.channel.send({"op": "upgrade", "id": 0, "to": to, "workers": m}, fds)
                self.asked.append(w)
        finally:
            for near, far in made.values():
                near.close()
                far.close()
        # Every worker's word, as it comes: the first failure calls the whole upgrade off
        failed = asyncio.ensure_future(self._tree_failed())
        words = {asyncio.ensure_future(_first(w, failed)): w for w in self.asked}
        try:
            for done in asyncio.as_completed(list(words)):
                reply = await done
                if reply.get("op") != "upgrade-adopted":
                    w = next(w for f, w in words.items() if f.done() and f.result() is reply)
                    self.ended.add(w.index)
                    raise UpgradeError(f"worker {w.index}: {str(reply.get('why'))[:300]}")
        finally:
            failed.cancel()
            for f in words:
                f.cancel()
        # Every worker is ready to commit: the kernel steers by the new tree's programs (the
        # old workers all stopped accepting: nobody serves by the old ones now), and the new
        # tree serves from here on
        if fmt >= 2:
            self.steered = True
            self.channel.send({"t": "steer"})
            await self._expect("steered")
        if sup.front is not None:
            sup.front.pause()
            self.admin_paused = True
        self.committed = True
        for w in self.asked:
            w.channel.send({"op": "upgrade-commit"})

    def _agree(self, hello: dict[str, Any]) -> tuple[int, int]:
        """The tree format both read, and the new tree's number of workers; UpgradeError when
        the new supervisor cannot take this tree."""
        assert self.channel is not None
        n, theirs, reads = self.sup.n, hello.get("workers"), hello.get("reads") or []
        m = theirs if isinstance(theirs, int) and not isinstance(theirs, bool) else 1
        both = [f for f in TREE_READS if f in reads]
        why = ""
        if not hello.get("tree"):
            why = changing_workers(n, m)
        elif not both:
            why = f"the new l4lb ({hello.get('version')}) reads no tree format of {TREE_READS}"
        elif m != n and max(both) < 2:
            why = f"the new l4lb ({hello.get('version')}) cannot change the number of workers"
        elif m != n and m * n > MAX_PAIRS:
            why = f"{n} workers to {m} takes {m * n} channels, over {MAX_PAIRS}: restart instead"
        if why:
            self.channel.send({"t": "refused"})
            raise UpgradeError(why)
        return max(both), m

    async def _send_state(self, fmt: int) -> None:
        assert self.channel is not None
        sup = self.sup
        self.channel.send({"t": "tree", "format": fmt, "version": VERSION, "workers": sup.n})
        for where, (_spec, socks) in sup.sockets.items():
            await self.channel.deliver(
                {"t": "sockets", "where": list(where)}, [s.fileno() for s in socks]
            )
        admin = sup.front.listening() if sup.front is not None else None
        if admin is not None:
            await self.channel.deliver({"t": "admin"}, [admin.fileno()])
            admin.close()
        counters: dict[str, Any] = {k: getattr(sup, k) for k in SUPERVISOR_COUNTERS}
        counters["restarts_by"] = dict(sup.restarts_by)
        counters["upgrades"] = dict(sup.upgrades)
        counters["admin_refused"] = dict(sup.admin_refused)
        await self.channel.deliver(
            {"t": "state", "counters": counters, "health": list(sup.health.values())}
        )

    async def _tree_failed(self) -> dict[str, Any]:
        """What the new supervisor says before the commit: only ever a failure."""
        message = await self._expect("serving")  # (never before the commit: an error, or gone)
        return {"op": "error", "why": f"the new supervisor said {message.get('t')!r} too early"}

    async def _expect(self, kind: str) -> dict[str, Any]:
        assert self.channel is not None
        return await expect(self.channel, kind, self.proc, self.errors)

    async def _after_commit(self) -> list[str]:
        """The waves: each old worker's line once it has handed over and gone; one whose
        successor failed drains (SIGTERM) and is waited for."""
        lines = []
        for w in self.asked:
            reply = await _first(w, None)
            if reply.get("op") == "upgraded" and reply.get("ok"):
                lines.append(f"worker {w.index}: {reply.get('line')}")
            else:
                why = str(reply.get("why"))[:300]
                log.warning(
                    "worker %d: %s; it drains what it still serves (up to %gs)",
                    w.index,
                    why,
                    self.sup.config.shutdown_timeout,
                )
                lines.append(f"worker {w.index} did not hand everything over: {why}")
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        for w in self.asked:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sup.config.shutdown_timeout + 5.0):
                    await w.proc.wait()
            if w.proc.returncode is None:
                w.proc.kill()
        if self.channel is not None:
            try:
                async with asyncio.timeout(TIMEOUT):
                    await self._expect("serving")
            except (TimeoutError, UpgradeError) as exc:
                log.warning("the new supervisor did not say it serves: %s", exc or "timeout")
            self.channel.close()
        return lines

    async def _undo(self) -> None:
        """Before the commit: every worker told to call it off (each thaws and serves on),
        the new tree killed, the admin listener back."""
        for w in self.asked:
            w.channel.send({"op": "upgrade-abort"})
        for w in self.asked:  # each says how it ended (it serves again then)
            if w.index in self.ended:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    while True:
                        reply = await _first(w, None)
                        if reply.get("op") in ("upgraded", "gone"):
                            break
        await kill_started(self.proc)
        if self.channel is not None:
            self.channel.close()
        if self.steered:  # (the new tree's programs: this tree's back)
            self.sup.steer()
        if self.resized:
            self.sup.unhold_hashed()
        if self.admin_paused and self.sup.front is not None:
            await self.sup.front.resume()
        if self.committed:
            sdnotify.notify(f"MAINPID={os.getpid()}")


async def _first(w: WorkerProc, other: asyncio.Future[dict[str, Any]] | None) -> dict[str, Any]:
    """The worker's next word on the upgrade (`{"op": "gone"}` if it exited), or `other`'s."""
    reply = asyncio.ensure_future(w.upgrade_replies.get())
    gone = asyncio.ensure_future(w.listened.wait())  # (its last words read first)
    waiting: list[asyncio.Future[Any]] = [reply, gone]
    if other is not None:
        waiting.append(other)
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if reply.done() and not reply.cancelled():  # (taken off the queue: put back)
            w.upgrade_replies.put_nowait(reply.result())
        reply.cancel()
        raise
    finally:
        gone.cancel()
    if reply.done():
        return reply.result()
    reply.cancel()
    if other is not None and other.done():
        return other.result()
    return {"op": "gone", "why": f"worker {w.index} exited"}


class TreeTakeover:
    """The new supervisor's side: everything the old one passes on, then its workers started
    on it, each taking over from its predecessor."""

    def __init__(self, sup: Supervisor, channel: Channel) -> None:
        self.sup = sup
        self.channel = channel
        self.admin: socket.socket | None = None
        self.format = TREE
        self.before = 0  # the old tree's number of workers (`receive`)

    async def receive(self) -> list[list[tuple[int, socket.socket]]]:
        """Until `end`: the sockets, the admin listener, the counters, and for each new worker
        its channels from the old ones, (old worker's index, socket)."""
        sup, channel = self.sup, self.channel
        channel.send(
            {
                "t": "hello",
                "pid": os.getpid(),
                "version": VERSION,
                "reads": list(TREE_READS),
                "tree": True,
                "workers": sup.n,
            }
        )
        begin = await self._next()
        if begin.get("t") != "tree" or begin.get("format") not in TREE_READS:
            raise StartupError(f"the old supervisor said {str(begin.get('t'))[:40]!r}")
        self.format = int(begin["format"])
        before = begin.get("workers", sup.n)
        self.before = n = before if isinstance(before, int) and 0 < before <= 64 else sup.n
        specs = {s.where: s for s in listen_specs(sup.config)}
        chans: list[list[tuple[int, socket.socket]]] = [[] for _ in range(sup.n)]
        while True:
            message, fds = await self._next_fds()
            kind = message.get("t")
            if kind == "sockets":
                socks = [socket.socket(fileno=fd) for fd in fds]
                h, p, proto = message.get("where") or ("", 0, "")
                spec = specs.get((str(h), int(p), str(proto)))
                if spec is None or len(socks) != n:  # a port this configuration drops
                    close_all(socks)
                    continue
                # Fewer workers: the old sockets beyond them retire (each served a while by
                # the new worker `serving(i)`, which its predecessor hands it to); more: bound
                # and appended by `_bind`
                close_all(socks[sup.n :])
                sup.sockets[spec.where] = (spec, socks[: sup.n])
            elif kind == "admin" and len(fds) == 1:
                self.admin = socket.socket(fileno=fds[0])
            elif kind == "state":
                _apply(sup, message)
            elif kind == "workers":
                _channels(chans, message, fds, n)
            elif kind == "end":
                break
            else:
                for fd in fds:
                    os.close(fd)
                raise StartupError(f"an unexpected message {str(kind)[:40]!r}")
        if len(chans) != sup.n or not all(chans):
            raise StartupError("the old supervisor sent no channel to its workers")
        return chans

    async def steer_when_told(self, steer: Callable[[], None]) -> None:
        """At the commit, the old supervisor says `steer`: the programs for this tree's number
        of workers are attached (every old worker stopped accepting), and `steered` said."""
        try:
            message = await self._next()
        except StartupError:  # (the old one went away: it called the upgrade off)
            return
        if message.get("t") == "steer":
            steer()
            self.channel.send({"t": "steered"})

    async def serving(self) -> None:
        """Every new worker serves: this process is systemd's main one, and says so."""
        self.sup.upgrades["ok"] += 1  # (the old one's count goes on here)
        sdnotify.notify(f"MAINPID={os.getpid()}")
        self.channel.send({"t": "serving"})
        self.channel.close()

    def fail(self, why: str) -> None:
        self.channel.send({"t": "error", "why": why})

    async def _next(self) -> dict[str, Any]:
        message, fds = await self._next_fds()
        for fd in fds:
            os.close(fd)
        return message

    async def _next_fds(self) -> tuple[dict[str, Any], list[int]]:
        got = await self.channel.recv()
        if got is None:
            raise StartupError("the old supervisor went away mid-hand-over")
        return got


def _channels(
    out: list[list[tuple[int, socket.socket]]], message: dict[str, Any], fds: list[int], before: int
) -> None:
    """Each new worker's channels from the old workers, (old index, socket), added to `out`
    (format 1: one each, the diagonal)."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    pairs = message.get("pairs", [[i, i] for i in range(len(out))])
    ok = isinstance(pairs, list) and len(pairs) == len(socks)
    for p, sock in zip(pairs if ok else [], socks, strict=False):
        if (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(x, int) for x in p)
            and 0 <= p[0] < before
            and 0 <= p[1] < len(out)
        ):
            out[p[1]].append((p[0], sock))
        else:
            ok = False
    if not ok:
        close_all(socks)
        raise StartupError("the old supervisor's channels to the workers do not match")


def _apply(sup: Supervisor, message: dict[str, Any]) -> None:
    counters = message.get("counters")
    if isinstance(counters, dict):
        for k in SUPERVISOR_COUNTERS:
            v = counters.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                setattr(sup, k, type(getattr(sup, k))(v))
        for name in ("restarts_by", "upgrades", "admin_refused"):
            got = counters.get(name)
            mine = getattr(sup, name)
            if isinstance(got, dict):
                for k, v in got.items():
                    if isinstance(v, int) and not isinstance(v, bool):
                        mine[str(k)] = v
    for verdict in message.get("health") or []:
        if isinstance(verdict, dict) and {"group", "backend", "ok", "why"} <= set(verdict):
            sup.health[(str(verdict["group"]), str(verdict["backend"]))] = verdict
