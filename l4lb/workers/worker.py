"""One worker process of `workers: N`: a whole balancer on the listening sockets its supervisor
opened, with its own affinity tables (the steering program sends it all of its clients' keys).

The supervisor starts it as `python -m l4lb worker` with L4LB_WORKER in the environment (its
index, its control channel and its sockets, as inherited descriptors), then talks to it over
the channel: the worker says "ready" once it serves, and answers "reload" (with the sockets of
any new ports attached) with what changed. Worker 0 runs the health checks and sends each
verdict that changes a backend ("health"); the supervisor passes them to the other workers.
SIGTERM and SIGINT shut it down gracefully, as they do a single process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from dataclasses import replace
from typing import Any

from ..balancer import Server
from ..config import ConfigError, load_config_text
from ..config.files import read_text
from ..core.spec import Config
from ..dataplane.listeners import Where
from ..runtime.channel import MAX_MESSAGE, Channel
from ..runtime.errors import ReloadError, StartupError, UpgradeError
from ..runtime.heap import settle_heap

log = logging.getLogger("l4lb.worker")
ENV = "L4LB_WORKER"
FILES_TIMEOUT = 10.0  # seconds for the supervisor's first message (it is queued already)


def load_snapshot(env: dict[str, Any], files: dict[str, bytes]) -> Config:
    """The configuration the supervisor accepted (a copy, so that a file edited since is not
    half-applied), with paths in it resolved beside the original file, the files it names as
    the supervisor read them (`files`: a key renamed or rewritten since is not this worker's
    to read; only a reload reads them again), and the number of workers the supervisor runs
    (a reload cannot change it). Blocking: run it in a thread on a loop."""
    text = read_text(env["snapshot"])
    config = load_config_text(text, env["source"], files)
    return replace(config, workers=int(env["workers"]))


def files_of(message: dict[str, Any]) -> dict[str, bytes]:
    """The files a supervisor's message carries (hex, by path); anything else is refused."""
    got = message.get("files")
    if not isinstance(got, dict):
        raise ConfigError(["the supervisor sent no files"])
    try:
        return {str(k): bytes.fromhex(v) for k, v in got.items()}
    except (TypeError, ValueError):
        raise ConfigError(["the supervisor's files are not hex"]) from None


def first_files(control: socket.socket) -> dict[str, bytes]:
    """The supervisor's first message: the files the configuration names (sent before the
    worker started, so it waits in the socket; a few seconds at most)."""
    control.settimeout(FILES_TIMEOUT)
    try:
        data = control.recv(MAX_MESSAGE)
        message = json.loads(data) if data else {}
    except (OSError, ValueError):
        message = {}
    finally:
        control.settimeout(None)
    if not isinstance(message, dict) or message.get("op") != "files":
        raise ConfigError(["the supervisor sent no files first"])
    return files_of(message)


def _sockets(entries: list[list[Any]], fds: list[int]) -> dict[Where, socket.socket]:
    for fd in fds:
        os.set_inheritable(fd, False)  # (passed to this process: not to those it starts)
    return {
        (str(h), int(p), str(proto)): socket.socket(fileno=fd)
        for (h, p, proto), fd in zip(entries, fds, strict=True)
    }


async def serve(env: dict[str, Any]) -> int:
    index = int(env["index"])
    sourced = [(int(i), int(fd)) for i, fd in env.get("sources", [])]
    for fd in (env["control"], env.get("takeover"), *(fd for _, fd in sourced)):
        if fd is not None:  # this process's, not its children's
            os.set_inheritable(int(fd), False)
    control = socket.socket(fileno=int(env["control"]))
    inherited = _sockets(env["sockets"], [int(fd) for fd in env["fds"]])
    try:
        config = await asyncio.to_thread(lambda: load_snapshot(env, first_files(control)))
    except ConfigError as exc:
        log.error("%s", exc.lines[0])
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read the supervisor's copy of the configuration: %s", exc)
        return 1
    channel = Channel(control)

    def tell(group: str, backend: str, healthy: bool, reason: str) -> None:
        channel.send(
            {"op": "health", "group": group, "backend": backend, "ok": healthy, "why": reason}
        )

    lead = index == 0  # worker 0 runs the health checks and tells the others
    # An upgrade's worker takes over from its predecessor (workers/upgrade.py)
    takeover = Channel(socket.socket(fileno=int(env["takeover"]))) if "takeover" in env else None
    # ... or from every old worker, when the number of workers changed (`before` them)
    sources = [(i, Channel(socket.socket(fileno=fd))) for i, fd in sourced]
    server = Server(
        config,
        inherited=inherited,
        worker=index,
        admin_path=env.get("admin"),
        follower=not lead,
        on_health=tell if lead else None,
        takeover=takeover,
        sources=sources,
        before=int(env.get("before", 0)),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come from the supervisor
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)  # passed on by the supervisor
    try:
        await server.start()
    except StartupError as exc:
        log.error("%s", exc)
        for pred in [takeover] if takeover is not None else [c for _, c in sources]:
            pred.send({"t": "error", "why": str(exc)})  # its predecessors say why, serve on
        await server.shutdown(0)
        return 1
    settle_heap()
    channel.send({"op": "ready", "pid": os.getpid()})
    commands = loop.create_task(_commands(server, channel, env))
    lost = loop.create_task(_orphaned(channel))
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([stopped, lost], return_when="FIRST_COMPLETED")
    commands.cancel()
    lost.cancel()
    stopped.cancel()
    await server.shutdown()
    channel.close()
    return 0


async def _orphaned(channel: Channel) -> None:
    """Returns when the supervisor is gone: a worker never outlives it."""
    await channel.gone.wait()
    log.warning("the supervisor is gone: shutting down")


async def _commands(server: Server, channel: Channel, env: dict[str, Any]) -> None:
    upgrading = Upgrading(server, channel)
    while True:
        got = await channel.recv()
        if got is None:
            return
        message, fds = got
        if message.get("op") == "ping":  # answered from the loop: a stuck loop cannot answer
            channel.send({"op": "pong", "id": message.get("id")})
        if upgrading.handles(message, fds):
            continue
        if message.get("op") == "health":
            for v in message.get("verdicts", []):
                try:
                    server.monitor.apply(v["group"], v["backend"], bool(v["ok"]), str(v["why"]))
                except (KeyError, TypeError):
                    log.warning("ignoring a malformed health verdict: %r", v)
        if message.get("op") != "reload":
            for fd in fds:
                os.close(fd)
            continue
        ident = message.get("id")  # the reply carries it: a late one is known as late
        assert server.listeners.inherited is not None
        server.listeners.inherited.update(_sockets(message.get("sockets", []), fds))
        try:
            config = await asyncio.to_thread(load_snapshot, env, files_of(message))
            changes = await server.apply(config)
        except (ConfigError, ReloadError) as exc:
            channel.send({"op": "reloaded", "id": ident, "ok": False, "lines": exc.lines})
        except Exception as exc:  # a bug must not stop this loop: the supervisor waits on it
            log.exception("reload failed")
            lines = [f"reload failed: {exc!r}"]
            channel.send({"op": "reloaded", "id": ident, "ok": False, "lines": lines})
        else:
            channel.send({"op": "reloaded", "id": ident, "ok": True, "changes": changes})
        for sock in server.listeners.inherited.values():  # offered but not taken: not ours to keep
            sock.close()
        server.listeners.inherited.clear()


class Upgrading:
    """A worker's part in its supervisor's upgrade (workers/upgrade.py): `upgrade` brings the
    channel to this worker's successor; the hand-over runs as a single process's does, except
    that it waits at the commit for `upgrade-commit` (every worker ready) or `upgrade-abort`,
    and says how it went (`upgrade-adopted`, then `upgraded`). Then this worker exits."""

    def __init__(self, server: Server, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.ident: object = None
        self.verdict: asyncio.Future[bool] | None = None
        self.successors: list[Channel] = []
        self.task: asyncio.Task[None] | None = None

    def handles(self, message: dict[str, Any], fds: list[int]) -> bool:
        op = message.get("op")
        if op == "upgrade":
            # One channel a new worker this one hands over to: its successor first (the
            # connections go there), then, when the number of workers changes, the others
            to = message.get("to", [0] * len(fds))
            if not fds or len(to) != len(fds) or self.task is not None:
                for fd in fds:
                    os.close(fd)
                self.channel.send({"op": "upgraded", "ok": False, "why": "no channel, or twice"})
                return True
            self.ident = message.get("id")
            self.successors = [Channel(socket.socket(fileno=fd)) for fd in fds]
            workers = message.get("workers")
            self.task = asyncio.get_running_loop().create_task(
                self._run(self.successors, workers if isinstance(workers, int) else None)
            )
            return True
        if op in ("upgrade-commit", "upgrade-abort"):
            if self.verdict is not None and not self.verdict.done():
                self.verdict.set_result(op == "upgrade-commit")
            elif op == "upgrade-abort":
                for successor in self.successors:
                    successor.close()  # (still handing over: it fails now, and thaws)
            return True
        return False

    async def _barrier(self) -> None:
        self.verdict = asyncio.get_running_loop().create_future()
        self.channel.send({"op": "upgrade-adopted", "id": self.ident})
        gone = asyncio.ensure_future(self.channel.gone.wait())
        waiting: list[asyncio.Future[Any]] = [self.verdict, gone]
        try:
            await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
        finally:
            gone.cancel()
        if not self.verdict.done() or not self.verdict.result():
            raise UpgradeError("the upgrade was called off (another worker could not hand over)")

    async def _run(self, successors: list[Channel], workers: int | None) -> None:
        try:
            line = await self.server.upgrade(
                successors[0], self._barrier, others=successors[1:], workers=workers
            )
        except UpgradeError as exc:
            self.channel.send({"op": "upgraded", "id": self.ident, "ok": False, "why": str(exc)})
            self.task = self.verdict = None
            self.successors = []
            return
        self.channel.send({"op": "upgraded", "id": self.ident, "ok": True, "line": line})


def environment() -> dict[str, Any]:
    return dict(json.loads(os.environ[ENV]))
