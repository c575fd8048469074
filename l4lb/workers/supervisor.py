"""`workers: N`: the supervisor that owns the listening sockets and keeps N workers on them.

Lifecycle (after uvicorn's multiprocess supervisor, but the sockets differ, see reuseport.py):

1. Bind every listening address N times with SO_REUSEPORT, in worker order, and attach the
   steering program, so a client's masked address picks its worker on every port of a group.
   The supervisor never accepts on them; it keeps them open so that the kernel's numbering of
   the group never changes while it runs.
2. Start worker i with socket i of every address (`python -m l4lb worker`), and a control
   channel; wait until every worker says it is ready, then log the start-up lines.
3. A worker that exits while we are not stopping is started again at once on the same sockets
   (its queued connections wait in the accept queue meanwhile); one that keeps dying is
   restarted with a growing delay, up to 30 s.
4. SIGHUP (or the admin API) reloads: the supervisor validates the file, binds any new ports
   (all or nothing), re-attaches the programs and hands each worker its new sockets; workers
   apply the same configuration as a single process would.
5. SIGTERM/SIGINT reach every worker, which drains as a single process does; the supervisor
   waits for them (shutdown_timeout, then a few seconds more), then closes the sockets.

The admin API, when configured, is served here (fanout.py) and shows the whole process: it asks
every worker over a private Unix socket and merges what they say. Worker 0 runs the health
checks; the supervisor passes its verdicts on to the others (and to any worker started again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, load_config_text
from ..config.describe import describe
from ..config.files import read_text
from ..core.reuseport import attach, detach, program
from ..core.spec import Config
from ..dataplane.listeners import ListenSpec, Where, bind, close_all, listen_specs, steering_masks
from ..runtime import channel as control
from ..runtime.channel import Channel
from ..runtime.errors import ReloadError, StartupError, UpgradeError
from ..runtime.handover import handed_over
from ..runtime.listening import RETIRE
from .upgrade import TreeTakeover, TreeUpgrade
from .worker import ENV

if TYPE_CHECKING:
    from ..admin.fanout import FrontAdmin

log = logging.getLogger("l4lb.supervisor")

READY_TIMEOUT = 30.0  # seconds for a worker to start serving
REPLY_TIMEOUT = 30.0  # seconds for a worker to answer a reload
MAX_BACKOFF = 30.0
VERDICTS_PER_MESSAGE = 200  # a message stays well under the socket buffer


PING_INTERVAL = 1.0  # seconds between the supervisor's pings of each worker
PINGS_MISSED = 3  # pings a worker may leave unanswered before it is killed and replaced


@dataclass
class WorkerProc:
    index: int
    proc: asyncio.subprocess.Process
    channel: control.Channel
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Requests awaiting their reply, by id: a reply that comes after its request gave up finds
    # no one here and is dropped, never taken for a later request's.
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    answered: float = 0.0  # when it last answered a ping (monotonic)
    unresponsive: bool = False  # killed for missing its pings
    admin_path: str | None = None
    # Its words on an upgrade (workers/upgrade.py), and whether its channel has been read out
    upgrade_replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    listened: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(
        self, config: Config, log_level: str = "info", takeover: Channel | None = None
    ) -> None:
        self.config = config
        # An upgrade's new supervisor: the old one's channel (workers/upgrade.py)
        self.takeover = TreeTakeover(self, takeover) if takeover is not None else None
        self.handing_over = False  # an upgrade runs: a worker that exits is not replaced
        self._missed: list[int] = []  # workers that exited meanwhile, replaced if it fails
        self.last_upgrade: dict[str, object] | None = None
        self.n = config.workers
        self.log_level = log_level
        self.rundir = tempfile.mkdtemp(prefix="l4lb-")  # 0700: the workers' admin sockets
        self.snapshot = str(Path(self.rundir) / "config.yaml")
        self.files: dict[str, bytes] = dict(config.files)  # the named files, as last read
        self.sockets: dict[Where, tuple[ListenSpec, list[socket.socket]]] = {}
        self.workers: list[WorkerProc | None] = [None] * self.n
        self.stopping = False
        self.restarts = 0
        self.restarts_by: dict[str, int] = {"exited": 0, "unresponsive": 0}
        self._ids = itertools.count(1)  # control requests' ids
        self.reloads_ok = 0
        self.upgrades: dict[str, int] = {"ok": 0, "failed": 0}
        self.reloads_failed = 0
        self.admin_refused: dict[str, int] = {}
        # The checking worker's latest verdict per (group, backend), passed on to the others
        self.health: dict[tuple[str, str], dict[str, Any]] = {}
        self.started_at = time.time()
        self._failures = [0] * self.n  # quick deaths in a row, per worker
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._front: FrontAdmin | None = None

    @property
    def ready(self) -> bool:
        return not self.stopping and all(
            w is not None and w.ready.is_set() and not w.channel.closed for w in self.workers
        )

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): every worker reopens its connection log files."""
        for w in self.live_workers():
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGUSR1)

    def live_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers if w is not None and not w.channel.closed]

    # ------------------------------------------------------------------ sockets

    def _bind(self, specs: list[ListenSpec]) -> list[Where]:
        """Bind N sockets for each spec not bound yet, in worker order; all or nothing."""
        new: dict[Where, tuple[ListenSpec, list[socket.socket]]] = {}
        for spec in specs:
            where = spec.where
            have = self.sockets.get(where, (spec, []))[1]
            if len(have) >= self.n:
                continue
            socks: list[socket.socket] = []
            try:
                # Another process listening there with SO_REUSEPORT (a second l4lb on the same
                # file, say) would let our sockets join its group and split its traffic: a
                # plain bind first fails as a single process's would. (An upgrade to more
                # workers appends to the group it took over: those are ours.)
                if not have:
                    bind(spec).close()
                for _ in range(self.n - len(have)):
                    socks.append(bind(spec, reuseport=True))
            except OSError as exc:
                close_all(socks)
                for w, (_, group) in new.items():
                    close_all(group[len(self.sockets.get(w, (spec, []))[1]) :])
                raise StartupError(
                    f"cannot listen on {spec} for group {spec.group!r}: {exc.strerror or exc}"
                ) from None
            new[where] = (spec, have + socks)
        self.sockets.update(new)
        return list(new)

    def steer(self) -> None:
        """(Re)attach each address's steering program for the current configuration."""
        for spec, socks in self.sockets.values():
            masks = steering_masks(self.config, spec)
            if masks is not None:
                attach(socks[0], program(masks[0], masks[1], self.n))

    def hold_hashed(self, workers: int, every: bool = False) -> None:
        """While an upgrade changes the number of workers, the addresses that the kernel's
        own hash spreads (no persistence) are held to the first `workers` sockets (by the
        client's whole address): a socket appended before its worker serves, or one that
        retires, is given nothing new. `unhold_hashed` gives the kernel its hash back.
        `every`: all addresses (a single process's sockets had no program at all)."""
        for spec, socks in self.sockets.values():
            if every or steering_masks(self.config, spec) is None:
                attach(socks[0], program(0xFFFFFFFF, 128, workers))

    def unhold_hashed(self) -> None:
        for spec, socks in self.sockets.values():
            if steering_masks(self.config, spec) is None:
                with contextlib.suppress(OSError):
                    detach(socks[0])

    def _steer_at_commit(self) -> None:
        self.steer()
        if self.takeover is not None and self.takeover.before != self.n:
            self.hold_hashed(self.n)  # (until the retiring sockets are closed)
            loop = asyncio.get_running_loop()
            loop.call_later(RETIRE + 2.0, self.unhold_hashed)

    async def _snapshot_source(self) -> tuple[str, Config]:
        """The file's text and its configuration, read once so that both agree (in a thread:
        the file and those it names may be slow, or not files at all)."""
        source = self.config.source

        def read() -> tuple[str, Config]:
            try:
                text = read_text(source)
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError([f"{source}: cannot read the file: {why}"]) from None
            return text, load_config_text(text, source)

        return await asyncio.to_thread(read)

    def _files(self) -> dict[str, str]:
        return {path: data.hex() for path, data in self.files.items()}

    def _write_snapshot(self, text: str) -> None:
        tmp = self.snapshot + ".new"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, self.snapshot)

    # ------------------------------------------------------------------ workers

    @property
    def front(self) -> FrontAdmin | None:
        return self._front

    async def _spawn(
        self, i: int, sources: list[tuple[int, socket.socket]] | None = None, before: int = 0
    ) -> WorkerProc:
        parent, child = control.pair()
        keys = list(self.sockets)
        fds = [self.sockets[k][1][i].fileno() for k in keys]
        admin_path = str(Path(self.rundir) / f"worker{i}.sock") if self.config.admin else None
        if admin_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(admin_path)  # a crashed worker's
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # the supervisor speaks for its workers
        passed = [child.fileno(), *fds]
        extra: dict[str, Any] = {}
        if sources is not None:  # an upgrade's: the channel to its predecessor, or to each
            passed += [sock.fileno() for _, sock in sources]  # old worker (`workers` changed)
            if before == self.n:
                extra["takeover"] = sources[0][1].fileno()
            else:
                extra["sources"] = [[k, sock.fileno()] for k, sock in sources]
                extra["before"] = before
        env[ENV] = json.dumps(
            {
                **extra,
                "index": i,
                "workers": self.n,
                "control": child.fileno(),
                "sockets": [list(k) for k in keys],
                "fds": fds,
                "snapshot": self.snapshot,
                "source": self.config.source,
                "admin": admin_path,
            }
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "l4lb",
                "--log-level",
                self.log_level,
                "worker",
                env=env,
                pass_fds=passed,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
            for _, sock in sources or []:
                sock.close()
        w = WorkerProc(i, proc, control.Channel(parent), time.monotonic(), admin_path=admin_path)
        # First of all, the files its configuration names, as this process read them: a worker
        # (a respawned one too) never reads a key or a token from disk (see worker.first_files).
        w.channel.send({"op": "files", "files": self._files()})
        self.workers[i] = w
        self._background(self._listen(w))
        self._background(self._watch(w))
        self._background(self._heartbeat(w))
        log.info("worker %d started (pid %d)", i, proc.pid)
        return w

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, w: WorkerProc) -> None:
        while True:
            got = await w.channel.recv()
            if got is None:
                w.listened.set()
                return
            message, fds = got
            for fd in fds:
                os.close(fd)
            op = message.get("op")
            if op in ("upgrade-adopted", "upgraded"):
                w.upgrade_replies.put_nowait(message)
            elif op == "pong":
                w.answered = time.monotonic()
            elif op == "ready":
                w.answered = time.monotonic()
                w.ready.set()
                log.info("worker %d ready (pid %d)", w.index, w.proc.pid)
                known = list(self.health.values())  # what the checks found so far
                for i in range(0, len(known), VERDICTS_PER_MESSAGE):
                    w.channel.send(
                        {"op": "health", "verdicts": known[i : i + VERDICTS_PER_MESSAGE]}
                    )
            elif op == "reloaded":
                waiter = w.pending.pop(message.get("id", -1), None)
                if waiter is None or waiter.done():
                    log.info("worker %d: dropped a late reload reply", w.index)
                else:
                    waiter.set_result(message)
            elif op == "health" and w.index == 0:
                verdict = {k: message.get(k) for k in ("group", "backend", "ok", "why")}
                self.health[(str(verdict["group"]), str(verdict["backend"]))] = verdict
                for other in self.live_workers():
                    if other is not w:
                        other.channel.send({"op": "health", "verdicts": [verdict]})

    async def _heartbeat(self, w: WorkerProc) -> None:
        """Ping the worker every second once it is ready; one that leaves `PINGS_MISSED` in a
        row unanswered (stopped, or its loop stuck) is killed, and `_watch` replaces it."""
        ready = asyncio.ensure_future(w.ready.wait())
        gone = asyncio.ensure_future(w.channel.gone.wait())  # (dead before it was ready)
        await asyncio.wait([ready, gone], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        gone.cancel()
        while not w.channel.closed and not self.stopping:
            await asyncio.sleep(PING_INTERVAL)
            silent = time.monotonic() - w.answered
            if silent > PING_INTERVAL * PINGS_MISSED:
                log.warning(
                    "worker %d (pid %d) answered no ping for %.1fs: killing it and starting"
                    " another on the same sockets",
                    w.index,
                    w.proc.pid,
                    silent,
                )
                w.unresponsive = True
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()  # (SIGKILL ends a stopped process too)
                return
            w.channel.send({"op": "ping", "id": next(self._ids)})

    async def _watch(self, w: WorkerProc) -> None:
        code = await w.proc.wait()
        w.channel.close()
        for waiter in w.pending.values():  # nothing it was asked will be answered now
            if not waiter.done():
                waiter.set_result({"ok": False, "gone": True})
        w.pending.clear()
        if self.stopping or self.workers[w.index] is not w:
            return
        if self.handing_over:  # (gone to its successor; or replaced if the upgrade fails)
            self._missed.append(w.index)
            return
        lived = time.monotonic() - w.started
        self.restarts += 1
        self.restarts_by["unresponsive" if w.unresponsive else "exited"] += 1
        if lived < 5.0:
            self._failures[w.index] += 1
        else:
            self._failures[w.index] = 0
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (self._failures[w.index] - 1))
        if self._failures[w.index] == 0:
            delay = 0.0
        how = "no answer" if w.unresponsive else f"signal {-code}" if code < 0 else f"code {code}"
        log.warning(
            "worker %d (pid %d) exited with %s; starting it again on the same sockets%s",
            w.index,
            w.proc.pid,
            how,
            f" in {delay:g}s" if delay else "",
        )
        if delay:
            await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(w.index)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        specs = listen_specs(self.config)
        chans = None
        if self.takeover is not None:  # the old supervisor's sockets, first
            self.handing_over = True
            chans = await self.takeover.receive()
            for where in [k for k in self.sockets if k not in {s.where for s in specs}]:
                close_all(self.sockets.pop(where)[1])
        try:
            before = self.takeover.before if self.takeover is not None else self.n
            if before != self.n:  # (before any socket is appended; one process's: no program)
                self.hold_hashed(before, every=before == 1)
            self._bind(specs)
            if self.takeover is None or self.takeover.format < 2:
                self.steer()
            else:  # at the commit, when the old supervisor says so
                self._background(self.takeover.steer_when_told(self._steer_at_commit))
            text, first = await self._snapshot_source()
        except ConfigError as exc:
            raise StartupError(exc.lines[0]) from None
        self._write_snapshot(text)
        self.files = dict(first.files)  # what a worker is given (a respawned one too)
        for i in range(self.n):
            await self._spawn(i, chans[i] if chans is not None else None, before)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                for w in list(self.workers):
                    assert w is not None
                    ready = asyncio.ensure_future(w.ready.wait())
                    await asyncio.wait(
                        [ready, asyncio.ensure_future(w.proc.wait())], return_when="FIRST_COMPLETED"
                    )
                    if not w.ready.is_set():
                        ready.cancel()
                        raise StartupError(f"worker {w.index} could not start (see above)")
        except TimeoutError:
            raise StartupError(f"the workers did not start within {READY_TIMEOUT:g}s") from None
        self.handing_over = False
        await self._start_admin(self.takeover.admin if self.takeover is not None else None)
        if self.takeover is not None:
            await self.takeover.serving()
            self.last_upgrade = {"at": time.time(), "line": "took over from the previous tree"}
            self.takeover = None
        log.info("%d workers serving, clients steered to them by their masked address", self.n)
        for g in self.config.groups:  # last, as in a single process: "fully started"
            log.info("%s", describe(self.config, specs, g.name))

    async def _start_admin(self, inherited: socket.socket | None = None) -> None:
        if self.config.admin is None:
            if inherited is not None:
                inherited.close()
            return
        from ..admin.fanout import FrontAdmin  # aiohttp loads only with the admin API

        front = FrontAdmin(self, self.config.admin)
        try:
            await front.start(inherited)
        except OSError as exc:
            where = f"{self.config.admin.host}:{self.config.admin.port}"
            raise StartupError(
                f"cannot listen on {where} for the admin API: {exc.strerror or exc}"
            ) from None
        self._front = front
        log.info("admin API on %s (all %d workers)", self.config.admin.url, self.n)

    def kill(self) -> None:
        """A second SIGTERM: no more waiting."""
        for w in self.workers:
            if w is not None and w.proc.returncode is None:
                w.proc.kill()

    async def shutdown(self) -> None:
        """Every worker drains as a single process would; then the sockets close."""
        self.stopping = True
        procs = [w.proc for w in self.workers if w is not None and w.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if procs:
            try:
                async with asyncio.timeout(self.config.shutdown_timeout + 5.0):
                    await asyncio.gather(*(p.wait() for p in procs))
            except TimeoutError:
                for p in procs:
                    if p.returncode is None:
                        log.warning("worker pid %d did not stop: killing it", p.pid)
                        p.kill()
                await asyncio.gather(*(p.wait() for p in procs))
        if self._front is not None:
            await self._front.stop()
            self._front = None
        for w in self.workers:
            if w is not None:
                w.channel.close()
        for task in list(self._tasks):
            task.cancel()
        for _, socks in self.sockets.values():
            close_all(socks)
        self.sockets.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("stopped")

    # ------------------------------------------------------------------ reload

    async def upgrade(self, successor: Channel | None = None) -> str:
        """Replace the whole tree with the l4lb installed now, each worker handing over to
        its successor (workers/upgrade.py); what moved, in one line, and this process exits.
        UpgradeError (everything serves on as it was) when it cannot."""
        if self.handing_over:
            raise UpgradeError("an upgrade is running already")
        if not self.ready:
            raise UpgradeError("the workers are not all serving: try again in a moment")
        self.handing_over = True
        self._missed = []
        try:
            line = await TreeUpgrade(self, successor).run()
        except UpgradeError as exc:
            self.handing_over = False
            self.upgrades["failed"] += 1
            log.error("upgrade failed; serving on: %s", exc)
            for i in self._missed:  # a worker that ended meanwhile (not handed over)
                await self._spawn(i)
            raise
        log.info("upgrade: %s; this process exits", line)
        asyncio.get_running_loop().call_later(0.2, handed_over)  # (the API's answer first)
        return line

    async def reload_from_file(self) -> list[str]:
        """Validate the file, bind new ports, and have every worker apply it; ReloadError when
        refused (nothing changed)."""
        async with self._reload_lock:
            try:
                return await self._reload()
            except ReloadError as exc:
                self.reloads_failed += 1
                for line in exc.lines:
                    log.error("reload refused: %s", line)
                raise

    async def _reload(self) -> list[str]:
        source = self.config.source
        try:
            text, new = await self._snapshot_source()
        except ConfigError as exc:
            raise ReloadError(exc.lines) from None
        except Exception as exc:  # a loader bug: still one refused, counted reload
            log.exception("the configuration could not be loaded")
            raise ReloadError([f"{source}: cannot be loaded: {exc!r}"]) from None
        notes = []
        if new.workers != self.n:
            notes.append(
                f"workers {self.n} -> {new.workers}: takes effect at the next upgrade or restart"
            )
            new = _with_workers(new, self.n)
        specs = listen_specs(new)
        for spec in specs:
            current = self.sockets.get(spec.where)
            if current is not None and current[0].v6only != spec.v6only:
                raise ReloadError(
                    [f"{spec}: changing whether it takes IPv4 clients needs a restart"]
                )
        try:
            added = self._bind(specs)
        except StartupError as exc:
            raise ReloadError([str(exc)]) from None
        wanted = {s.where for s in specs}
        self._write_snapshot(text)
        self.config = new
        # Only now, with the snapshot: a reload refused above leaves a respawned worker the
        # files that go with the configuration it is given.
        self.files = dict(new.files)
        self.steer()
        changes: list[str] | None = None
        failures: list[str] = []
        for w in self.live_workers():
            fds = [self.sockets[k][1][w.index].fileno() for k in added]
            message = {"op": "reload", "sockets": [list(k) for k in added], "files": self._files()}
            reply = await self._ask(w, message, fds)
            if reply is None:
                failures.append(
                    f"worker {w.index} did not answer the reload within {REPLY_TIMEOUT:g}s"
                )
            elif reply.get("gone"):
                failures.append(
                    f"worker {w.index} ended during the reload: its replacement starts on the"
                    " new configuration"
                )
            elif reply.get("ok"):
                changes = changes if changes is not None else list(reply.get("changes", []))
            else:
                failures += [f"worker {w.index}: {line}" for line in reply.get("lines", [])]
        for where in [k for k in self.sockets if k not in wanted]:
            close_all(self.sockets.pop(where)[1])
        if failures:  # not every worker applied it: said as it is, not as a success
            applied = "; ".join(changes or []) or "no changes"
            raise ReloadError(
                [*failures, f"the workers that answered applied: {applied}"], partial=True
            )
        self.reloads_ok += 1
        result = (changes or []) + notes
        log.info("reloaded %s: %s", source, "; ".join(result) or "no changes")
        return result

    async def _ask(
        self, w: WorkerProc, message: dict[str, Any], fds: list[int]
    ) -> dict[str, Any] | None:
        """Send a request with an id of its own and wait for the reply that carries it; None
        when none came in time (a late one is dropped when it comes)."""
        ident = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        w.pending[ident] = waiter
        if not w.channel.send({**message, "id": ident}, fds):
            w.pending.pop(ident, None)
            return {"ok": False, "gone": True}  # it died: its respawn reads the new snapshot
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await waiter
        except TimeoutError:
            return None
        finally:
            w.pending.pop(ident, None)


def _with_workers(config: Config, n: int) -> Config:
    return replace(config, workers=n)
