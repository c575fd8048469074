"""The HA pair's routes of the admin API (runtime/pair.py): the operator's hand-over, the pair's
state, and the peer link's three calls (each needs the admin token, as every change does)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..runtime import pairtake
from ..runtime.pair import Pair, PairError
from ..runtime.pairsync import IdleSync
from .lifecycle import ApiError

if TYPE_CHECKING:
    from .view import Balancer

HA_MAX_BODY = 256 << 20  # a prepare's body: every open connection's record and queues
BIG_BODIES = frozenset({"/api/v1/ha/prepare", "/api/v1/ha/idle"})
PAIR_ROUTES = (
    ("GET", "/api/v1/ha", "ha_status"),
    ("POST", "/api/v1/handover", "handover"),
    ("POST", "/api/v1/ha/prepare", "ha_prepare"),
    ("POST", "/api/v1/ha/commit", "ha_commit"),
    ("POST", "/api/v1/ha/abort", "ha_abort"),
    ("POST", "/api/v1/ha/idle", "ha_idle"),
)


class PairRoutes:
    """The routes, mixed into the admin server (it gives `server` and `_json_body`)."""

    server: Balancer
    _json_body: Callable[[web.Request], Awaitable[dict[str, Any]]]

    def _pair(self) -> Pair:
        pair = self.server.pair
        if pair is None:
            raise ApiError(404, "this l4lb is no HA pair's (no ha section)", "not_found")
        return pair

    async def ha_status(self, request: web.Request) -> web.Response:
        pair = self._pair()
        out = pair.status()
        if request.query.get("peer") == "1":  # (the operator's view; the peer link never asks)
            out["peer_state"] = await pair.peer_status()
        return web.json_response(out)

    async def handover(self, request: web.Request) -> web.Response:
        return await self._call(request, lambda p, _: p.handover())

    async def ha_prepare(self, request: web.Request) -> web.Response:
        return await self._call(request, pairtake.prepare)

    async def ha_commit(self, request: web.Request) -> web.Response:
        return await self._call(request, pairtake.commit)

    async def ha_abort(self, request: web.Request) -> web.Response:
        return await self._call(request, pairtake.abort)

    async def ha_idle(self, request: web.Request) -> web.Response:
        async def receive(pair: Pair, body: dict[str, Any]) -> dict[str, Any]:
            if not isinstance(pair.idle, IdleSync):
                raise PairError("this host keeps no idle connections")
            return pair.idle.receive(body)

        return await self._call(request, receive)

    async def _call(
        self,
        request: web.Request,
        step: Callable[[Pair, dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> web.Response:
        pair = self._pair()
        body = await self._json_body(request)
        try:
            return web.json_response(await step(pair, body))
        except PairError as exc:
            raise ApiError(409, str(exc), "ha_refused") from None
