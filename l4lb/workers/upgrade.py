"""Upgrades of `workers: N`: the whole tree replaced, each worker handing over to its successor.

Theory of operation
-------------------
Why the whole tree and not worker by worker under the old supervisor: the supervisor is code
too (it would stay old), and "no old process left" holds only if it goes. Why each worker to
its own successor: a worker's clients are the ones the kernel steers to its socket of each
reuseport group, and its pins and flows are theirs; worker i's successor serves the same
socket i (the supervisors pass the very sockets on), so every pin, flow and connection stays
with the socket its clients reach. That is also why an upgrade keeps the number of workers:
a group that grows or shrinks while clients queue in it would move them between sockets
(`handover.changing_workers` says so and refuses).

The old supervisor (`TreeUpgrade.run`), on SIGUSR2, `l4lb ctl upgrade` or the API:

1. starts the new l4lb as a single process's upgrade does (`handover.start_successor`); it
   loads the configuration, sees `workers: N`, runs as a supervisor and says `hello`.
2. sends it every listening socket (N a port, in the group's order), the admin listener,
   what it counted and the checks' verdicts, and one end of N socket pairs; `end`.
3. the new supervisor binds any new port, attaches the steering programs, and starts worker
   i on socket i with the other end of pair i. The old supervisor gives each of its workers
   the near end (`upgrade`); each runs a single process's hand-over to its successor
   (runtime/handover.py) up to the commit, and says `upgrade-adopted`.
4. once every worker has, the old supervisor stops its admin listener and says
   `upgrade-commit` to all: the new workers serve (and say `ready` to their supervisor,
   which becomes systemd's main process and says `serving`); the connections move in waves.
   If any worker cannot hand over before that, all are told `upgrade-abort`: they thaw and
   serve on, the new tree is killed, and nothing changed.
5. each old worker exits once its waves are done; the old supervisor waits for them and
   exits. A new worker that dies during its waves leaves its predecessor serving what had not
   moved: that one is told to stop accepting and drain (SIGTERM, up to shutdown_timeout), and
   the old supervisor waits for it before it goes.
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
from collections.abc import Sequence
from typing import Any, Protocol

from ..core.spec import Config
from ..dataplane.listeners import ListenSpec, Where, listen_specs
from ..runtime import sdnotify
from ..runtime.channel import Channel, pair
from ..runtime.errors import StartupError, UpgradeError
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
TREE = 1  # the supervisors' own format (the workers speak runtime/handform.py's)
TREE_READS = (1,)
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
        pid = hello.get("pid")
        self.pid = pid if isinstance(pid, int) else 0
        theirs = hello.get("workers")
        if not hello.get("tree") or theirs != sup.n:
            self.channel.send({"t": "refused"})
            raise UpgradeError(changing_workers(sup.n, theirs if isinstance(theirs, int) else 1))
        if TREE not in (hello.get("reads") or []):
            self.channel.send({"t": "refused"})
            raise UpgradeError(f"the new l4lb ({hello.get('version')}) reads no tree format {TREE}")
        await self._send_state()
        # One pair a worker: the new supervisor gets one end, the old worker the other
        near, far = zip(*(pair() for _ in range(sup.n)), strict=True)
        try:
            await self.channel.deliver({"t": "workers"}, [s.fileno() for s in far])
            self.channel.send({"t": "end"})
            for w, sock in zip(list(sup.workers), near, strict=True):
                if w is None or w.channel.closed:
                    raise UpgradeError("a worker is restarting: try again in a moment")
                while not w.upgrade_replies.empty():  # (a previous, failed upgrade's)
                    w.upgrade_replies.get_nowait()
                w.channel.send({"op": "upgrade", "id": 0}, [sock.fileno()])
                self.asked.append(w)
        finally:
            for sock in (*near, *far):
                sock.close()
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
        # Every worker is ready to commit: the new tree serves from here on
        if sup.front is not None:
            sup.front.pause()
            self.admin_paused = True
        self.committed = True
        for w in self.asked:
            w.channel.send({"op": "upgrade-commit"})

    async def _send_state(self) -> None:
        assert self.channel is not None
        sup = self.sup
        self.channel.send({"t": "tree", "format": TREE, "version": VERSION})
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

    async def receive(self) -> list[socket.socket]:
        """Until `end`: the sockets, the admin listener, the counters, the workers' channels."""
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
        specs = {s.where: s for s in listen_specs(sup.config)}
        chans: list[socket.socket] = []
        while True:
            message, fds = await self._next_fds()
            kind = message.get("t")
            if kind == "sockets":
                socks = [socket.socket(fileno=fd) for fd in fds]
                h, p, proto = message.get("where") or ("", 0, "")
                spec = specs.get((str(h), int(p), str(proto)))
                if spec is None or len(socks) != sup.n:  # a port this configuration drops
                    for s in socks:
                        s.close()
                    continue
                sup.sockets[spec.where] = (spec, socks)
            elif kind == "admin" and len(fds) == 1:
                self.admin = socket.socket(fileno=fds[0])
            elif kind == "state":
                _apply(sup, message)
            elif kind == "workers" and len(fds) == sup.n:
                chans = [socket.socket(fileno=fd) for fd in fds]
            elif kind == "end":
                break
            else:
                for fd in fds:
                    os.close(fd)
                raise StartupError(f"an unexpected message {str(kind)[:40]!r}")
        if len(chans) != sup.n:
            raise StartupError("the old supervisor sent no channel to its workers")
        return chans

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
