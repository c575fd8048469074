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
from pathlib import Path
from typing import Any

from ..balancer import Server
from ..config import Config, ConfigError, load_config_text
from ..dataplane.listeners import Where
from ..runtime.errors import ReloadError, StartupError
from ..runtime.heap import settle_heap
from .control import Channel

log = logging.getLogger("l4lb.worker")
ENV = "L4LB_WORKER"


def load_snapshot(env: dict[str, Any]) -> Config:
    """The configuration the supervisor accepted (a copy, so that a file edited since is not
    half-applied), with paths in it resolved beside the original file, and the number of
    workers the supervisor runs (a reload cannot change it)."""
    text = Path(env["snapshot"]).read_text(encoding="utf-8")
    return replace(load_config_text(text, env["source"]), workers=int(env["workers"]))


def _sockets(entries: list[list[Any]], fds: list[int]) -> dict[Where, socket.socket]:
    return {
        (str(h), int(p), str(proto)): socket.socket(fileno=fd)
        for (h, p, proto), fd in zip(entries, fds, strict=True)
    }


async def serve(env: dict[str, Any]) -> int:
    index = int(env["index"])
    control = socket.socket(fileno=int(env["control"]))
    inherited = _sockets(env["sockets"], [int(fd) for fd in env["fds"]])
    try:
        config = load_snapshot(env)
    except ConfigError as exc:
        log.error("%s", exc.lines[0])
        return 1
    channel = Channel(control)

    def tell(group: str, backend: str, healthy: bool, reason: str) -> None:
        channel.send(
            {"op": "health", "group": group, "backend": backend, "ok": healthy, "why": reason}
        )

    lead = index == 0  # worker 0 runs the health checks and tells the others
    server = Server(
        config,
        inherited=inherited,
        worker=index,
        admin_path=env.get("admin"),
        follower=not lead,
        on_health=tell if lead else None,
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
    while True:
        got = await channel.recv()
        if got is None:
            return
        message, fds = got
        if message.get("op") == "ping":  # answered from the loop: a stuck loop cannot answer
            channel.send({"op": "pong", "id": message.get("id")})
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
            config = load_snapshot(env)
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


def environment() -> dict[str, Any]:
    return dict(json.loads(os.environ[ENV]))
