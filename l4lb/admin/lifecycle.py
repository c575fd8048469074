"""The process's lifecycle as the admin API serves it: a reload and an upgrade on request
(`POST /api/v1/reload`, `/api/v1/upgrade`), its own listener held still while an upgrade hands
it to the new process, and `ApiError`, how a handler refuses a request."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..runtime.errors import ReloadError, UpgradeError


class ApiError(Exception):
    """A request refused: its status, and its reason as the refusals are counted."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Lifecycle:
    """A mixin of `api.ApiBase`: its `reload` and `upgrade` handlers, and listener controls."""

    _reloader: Callable[[], Awaitable[list[str]]]
    _upgrader: Callable[[], Awaitable[str]] | None
    _listener: asyncio.Server | None
    _guard: Any
    _held: socket.socket | None = None

    def _refuse(self, reason: str) -> None:
        raise NotImplementedError  # (ApiBase's)

    async def reload(self, request: web.Request) -> web.Response:
        try:
            changes = await self._reloader()
        except ReloadError as exc:
            if exc.partial:  # some workers applied it, some did not: an error, said so
                self._refuse("reload_partial")
                return web.json_response(
                    {
                        "ok": False,
                        "error": "reload not applied by every worker",
                        "lines": exc.lines,
                    },
                    status=503,
                )
            raise ApiError(
                400, "reload refused, nothing changed: " + " | ".join(exc.lines)
            ) from None
        return web.json_response({"ok": True, "changes": changes})

    async def upgrade(self, request: web.Request) -> web.Response:
        """Hand everything to the l4lb installed now (runtime/handover.py). Answered once the
        new process serves (this one then exits), or with why nothing changed."""
        if self._upgrader is None:
            return web.json_response(
                {"ok": False, "error": "this process cannot be upgraded on its own"}, status=409
            )
        try:
            line = await self._upgrader()
        except UpgradeError as exc:
            return web.json_response(
                {"ok": False, "error": f"upgrade failed, serving on: {exc}"}, status=503
            )
        return web.json_response({"ok": True, "upgrade": line})

    def listening(self) -> socket.socket | None:
        """A duplicate of the TCP listening socket, for the new process of an upgrade."""
        if self._listener is None or not self._listener.sockets:
            return None
        sock = self._listener.sockets[0]
        if sock.family == socket.AF_UNIX:
            return None
        return socket.socket(fileno=os.dup(sock.fileno()))

    def pause(self) -> None:
        """Stop accepting (the new process of an upgrade is about to); `resume` undoes it."""
        held = self.listening()
        if held is None or self._listener is None:
            return
        self._held = held
        self._listener.close()
        self._listener = None

    async def release(self) -> None:
        """Accept, after a `start(hold=True)` (an upgrade's new process, at its commit)."""
        if self._listener is not None and not self._listener.is_serving():
            await self._listener.start_serving()

    async def resume(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            loop = asyncio.get_running_loop()
            self._listener = await loop.create_server(self._guard, sock=held, backlog=128)
