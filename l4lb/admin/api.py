"""The admin HTTP API, the status page and /metrics, on their own listener (aiohttp).

Reads are open to whoever can reach the listener (loopback by default); calls that change
anything need `Authorization: Bearer <token>` with the token in `admin.token_file`, and are
refused with 403 when no token file is configured. A refused or malformed request gets a JSON
error, is counted, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config.files import read_text
from ..config.validator import NAMED_LIMIT
from ..config.values import token_problem
from ..core.affinity import Entry
from ..core.backends import Backend, State
from ..core.flowstats import UdpStats
from ..core.keys import V6_TAG, format_key, format_netmask
from ..core.routing import Router
from ..core.spec import MAX_WEIGHT, AdminSpec, QuicLbSpec
from ..dataplane import walk
from .guard import MAX_BODY, Guard, reason_of, runner_options
from .lifecycle import ApiError, Lifecycle
from .metrics import make_registry
from .paging import cursor_of, key_span
from .pairapi import BIG_BODIES, HA_MAX_BODY, PAIR_ROUTES, PairRoutes

if TYPE_CHECKING:
    from .view import Balancer

log = logging.getLogger("l4lb.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIST = 100_000  # affinity entries in one answer, at most
RUN = 16_384  # keys a listing sorts at once


def backend_json(
    group: str,
    b: Backend,
    *,
    last_check: dict[str, Any] | None = None,
    service_ports: tuple[int, ...] = (),
    checks: list[dict[str, Any]] | None = None,
    flowing: tuple[int, int] = (0, 0),
    udp_ports: tuple[int, ...] = (),
    flows: int = 0,
) -> dict[str, Any]:
    now = time.time()
    host = f"[{b.address}]" if ":" in b.address else b.address
    return {
        "group": group,
        "name": b.name,
        "address": b.address,
        "hostname": b.hostname or None,  # the DNS name it was resolved from
        "resolve_error": b.unresolved or None,  # why that name has no address (then down)
        "ports": {str(k): v for k, v in b.ports.items()},
        # service port -> where its connections go, since several backends may share a host
        "addresses": {
            **{str(p): f"{host}:{b.port_for(p)}" for p in service_ports},
            **{f"{p}/udp": f"{host}:{b.udp_port_for(p)}" for p in udp_ports},
        },
        "udp_ports": {str(k): v for k, v in b.udp_ports.items()},
        "server_id": b.server_id or None,  # QUIC-LB
        "flows": flows,  # UDP flows open (of `active`)
        "state_since": round(now - b.changed_at, 1) if b.changed_at else None,
        "downtime": round(b.downtime(now), 1),
        "peak": b.peak,
        "waiting": b.waiting,
        "effective_weight": round(b.eff, 3),
        "failures": {
            "refused": b.failed_refused,
            "timeout": b.failed_timeout,
            "error": b.connect_failures - b.failed_refused - b.failed_timeout,
        },
        "checks": checks or [],
        "state": b.state.value,
        "admin_state": b.admin.value,
        "healthy": b.healthy,
        "weight": b.weight,
        "backup": b.backup,  # takes new clients only when no other backend can
        "max_conns": b.max_conns,
        "active": b.active,
        "connections": b.connections,
        "connect_failures": b.connect_failures,
        "bytes_in": b.bytes_in + flowing[0],  # open connections included
        "bytes_out": b.bytes_out + flowing[1],
        "last_check": last_check,
    }


CSV_COLUMNS = (
    "group",
    "name",
    "addresses",
    "state",
    "state_since",
    "downtime",
    "weight",
    "effective_weight",
    "backup",
    "max_conns",
    "active",
    "peak",
    "waiting",
    "connections",
    "connect_failures",
    "bytes_in",
    "bytes_out",
    "last_check",
)


def backends_csv(rows: list[dict[str, Any]]) -> str:
    """The backends as CSV (`?format=csv`), one row each, for a spreadsheet or a script."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        check = r.get("last_check") or {}
        w.writerow(
            [
                " ".join(f"{k}->{v}" for k, v in r["addresses"].items())
                if c == "addresses"
                else check.get("detail", "")
                if c == "last_check"
                else r.get(c, "")
                for c in CSV_COLUMNS
            ]
        )
    return out.getvalue()


def backends_answer(request: web.Request, rows: list[dict[str, Any]]) -> web.Response:
    if request.query.get("format") == "csv":
        return web.Response(text=backends_csv(rows), content_type="text/csv")
    if request.query.get("format") not in (None, "json"):
        raise ApiError(400, "format is json or csv")
    return web.json_response({"backends": rows})


async def authorize(spec: AdminSpec, request: web.Request) -> None:
    """The bearer token of `spec.token_file` is required; raises ApiError otherwise. The file
    is read at each request (a rotated token needs no reload), in a thread."""
    if spec.token_file is None:
        raise ApiError(
            403,
            "changes are disabled: this admin API has no token (admin.token_file in the"
            " configuration; with `l4lb run -l ... -b ...`, --admin-token-file)",
            "forbidden",
        )
    try:
        token = (await asyncio.to_thread(read_text, spec.token_file, NAMED_LIMIT)).strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ApiError(403, f"cannot read the token file: {why}", "forbidden") from None
    if token_problem(token) is not None:  # (edited since l4lb check passed it)
        raise ApiError(403, "the token file holds no usable token", "forbidden")
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    value = value.strip()
    if (
        scheme.lower() != "bearer"
        or not value.isascii()
        or not hmac.compare_digest(value.encode(), token.encode())
    ):
        raise ApiError(
            401, "a valid 'Authorization: Bearer <token>' header is required", "unauthorized"
        )


def host_allowed(host: str, spec: AdminSpec) -> bool:
    """Whether a request's `Host` names this API: an IP address (no DNS rebinding can forge
    one), `localhost`, or a name the operator lists in `admin.hosts`. A page that a rebound
    name loaded in a browser carries that name, and is refused before it can read a thing."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    if name == "localhost" or name in spec.hosts:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# On every answer: no page of the admin API may be framed by another (clickjacking its buttons).
FRAME_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
# Answered without a token, even with read_token: the probes, and the status page's HTML (it
# holds no data: its reads ask for the token, which the page's box sends).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})


ROUTES = (
    ("GET", "/", "status_page"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("GET", "/api/v1/groups", "groups"),
    ("GET", "/api/v1/backends", "backends"),
    ("POST", "/api/v1/backends/{group}/{name}", "update_backend"),
    ("GET", "/api/v1/affinity", "affinity"),
    ("DELETE", "/api/v1/affinity", "flush_affinity"),
    ("GET", "/api/v1/events", "events"),
    ("GET", "/api/v1/history", "history"),
    ("POST", "/api/v1/reload", "reload"),
    ("POST", "/api/v1/upgrade", "upgrade"),
)


class ApiBase(Lifecycle):
    """What every admin listener shares: the routes (by handler name), the listener, the error
    middleware that authorizes changes and counts refusals, and the static pages."""

    routes: tuple[tuple[str, str, str], ...] = ROUTES
    max_body = MAX_BODY  # (an HA pair's peer sends more: its connections)

    def __init__(
        self,
        spec: AdminSpec,
        refused: dict[str, int],
        unix_path: str | None,
        reloader: Callable[[], Awaitable[list[str]]],
        upgrader: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.spec = spec
        self.refused = refused
        self._reloader = reloader  # the process's or the supervisor's reload_from_file
        self._upgrader = upgrader  # the process's upgrade (None: not here)
        self.unix_path = unix_path  # a worker answers its supervisor here, not on spec's port
        self.runner: web.AppRunner | None = None
        self._guard: Guard | None = None
        self._listener: asyncio.Server | None = None
        self._status_page = (
            resources.files("l4lb.admin").joinpath("static/status.html").read_bytes()
        )

    async def start(self, sock: socket.socket | None = None, hold: bool = False) -> None:
        """Serve (on `sock`, an upgrade's inherited listener, when given; `hold`: accept only
        from `release` on)."""
        app = web.Application(middlewares=[self._errors], client_max_size=self.max_body)
        app.on_response_prepare.append(self._frame_headers)
        app.add_routes([web.route(m, path, getattr(self, name)) for m, path, name in self.routes])
        spec = self.spec
        options = runner_options(self._refuse, spec.request_timeout)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0, **options)
        await self.runner.setup()
        assert self.runner.server is not None
        self._guard = Guard(
            self.runner.server,
            self._refuse,
            spec.request_timeout,
            spec.max_connections,
            spec.max_connections_per_peer,
        )
        loop = asyncio.get_running_loop()
        if sock is not None and not _listens_at(sock, spec.host, spec.port):
            sock.close()  # (an upgrade that moved the admin API: its new address is bound)
            sock = None
        try:
            if sock is not None:
                self._listener = await loop.create_server(
                    self._guard, sock=sock, backlog=128, start_serving=not hold
                )
            elif self.unix_path is not None:
                self._listener = await loop.create_unix_server(
                    self._guard, self.unix_path, backlog=128
                )
            else:
                self._listener = await loop.create_server(
                    self._guard, self.spec.host, self.spec.port, backlog=128, reuse_address=True
                )
        except OSError:
            await self.runner.cleanup()
            raise

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._guard is not None:
            self._guard.served.add(request.protocol)
        try:
            await self._screen(request)
            return await handler(request)
        except ApiError as exc:
            self._refuse(exc.reason)
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPException as exc:
            if exc.status >= 400:
                reason = {404: "not_found", 405: "bad_method", 413: "too_large"}
                self._refuse(reason.get(exc.status, "bad_request"))
                return web.json_response({"error": exc.reason}, status=exc.status)
            raise
        except http_exceptions.HttpProcessingError as exc:  # a broken body, read by a handler
            self._refuse(reason_of(exc))
            return web.json_response({"error": f"malformed request: {exc.message}"}, status=400)

    async def _screen(self, request: web.Request) -> None:
        """What is refused before any handler parses a thing; raises ApiError."""
        for name, value in request.headers.items():
            if not value.isascii():
                raise ApiError(400, f"the {name} header is not ASCII", "bad_header")
        host = request.headers.get("Host")
        if self.unix_path is None and host is not None and not host_allowed(host, self.spec):
            raise ApiError(
                403,
                f"Host {host!r} is not this admin API's: use its address, localhost, or a name"
                " listed in admin.hosts",
                "bad_host",
            )
        size = request.content_length
        limit = self.max_body if request.path in BIG_BODIES else MAX_BODY
        if size is not None and size > limit:
            raise ApiError(413, f"a request body is at most {limit} bytes, not {size}", "too_large")
        if request.method not in ("GET", "HEAD") or (
            self.spec.read_token and request.path not in OPEN_PATHS
        ):
            await authorize(self.spec, request)

    @staticmethod
    async def _frame_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(FRAME_HEADERS)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within `request_timeout` (its size is bounded by `client_max_size`)."""
        timeout = self.spec.request_timeout
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except TimeoutError:
            raise ApiError(
                408, f"the body did not arrive within {timeout:g}s", "body_timeout"
            ) from None

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._status_page, content_type="text/html", charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


class AdminServer(PairRoutes, ApiBase):
    routes = ROUTES + PAIR_ROUTES

    def __init__(self, server: Balancer, spec: AdminSpec, unix_path: str | None = None) -> None:
        super().__init__(
            spec, server.admin_refused, unix_path, server.reload_from_file, server.upgrade
        )
        self.server = server
        self.registry = make_registry(server)
        if server.pair is not None:
            self.max_body = HA_MAX_BODY

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # ValueError: not JSON, not UTF-8, or an integer of more than 4300 digits;
            # RecursionError: nested deeper than the parser goes.
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise ApiError(400, f"the body is not valid JSON: {why}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _router(self, name: str) -> Router:
        router = self.server.routers.get(name)
        if router is None:
            raise ApiError(404, f"no group {name!r}", "not_found")
        return router

    # ------------------------------------------------------------------ pages

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.server.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    # ------------------------------------------------------------------ groups and backends

    async def groups(self, request: web.Request) -> web.Response:
        out = []
        for name, router in self.server.routers.items():
            g = router.spec
            st = router.stats
            table = router.table
            out.append(
                {
                    "name": name,
                    "mark": g.mark,
                    "listen": list(g.listen),
                    "ports": list(g.ports),
                    "udp_ports": list(g.udp_ports),
                    "scheduler": g.scheduler,
                    "persistence": {
                        "timeout": g.persistence.timeout,
                        "netmask": format_netmask(g.persistence.netmask),
                        "ipv6_prefix": g.persistence.ipv6_prefix,
                        "entries": len(table) if table is not None else 0,
                        "active_entries": table.active_count if table is not None else 0,
                    },
                    "sorry_server_serving": router.sorry is not None and router.quorum.lost,
                    "backends_up": router.up_count(),
                    "stats": {
                        "accepted": st.accepted,
                        "no_backend": st.no_backend,
                        "connect_failures": st.connect_failures,
                        "repins": st.repins,
                        "unpinned": st.unpinned,
                        "sorry": st.sorry,
                    },
                    "udp": udp_json(self.server.udp_stats.get(name)),
                    "quic_lb": quic_lb_json(g.quic_lb),
                }
            )
        return web.json_response(
            {
                "groups": out,
                "uptime": time.time() - self.server.started_at,
                "started_at": self.server.started_at,
                "last_upgrade": self.server.last_upgrade,
                "ha": self.server.pair.status() if self.server.pair is not None else None,
            }
        )

    def _last_check(self, group: str, name: str) -> dict[str, Any] | None:
        r = self.server.monitor.results.get((group, name))
        if r is None:
            return None
        return {"ok": r.ok, "detail": r.detail, "duration": round(r.duration, 6), "time": r.time}

    def _backend(
        self, router: Router, b: Backend, flowing: Mapping[Any, list[int]], flows: Mapping[Any, int]
    ) -> dict[str, Any]:
        recent = self.server.monitor.recent.get((router.name, b.name), ())
        checks = [{"ok": r.ok, "time": r.time, "detail": r.detail} for r in recent]
        moving = flowing.get((router.name, b.name), (0, 0))
        return backend_json(
            router.name,
            b,
            last_check=self._last_check(router.name, b.name),
            service_ports=router.spec.ports,
            checks=checks,
            flowing=(moving[0], moving[1]),
            udp_ports=router.spec.udp_ports,
            flows=flows.get((router.name, b.name), 0),
        )

    async def backends(self, request: web.Request) -> web.Response:
        only = request.query.get("group")
        if only is not None:
            self._router(only)
        flowing = self.server.in_flight()
        flows = self.server.flows_by_backend()
        for router in self.server.routers.values():
            if router.ramping:
                router.ramp()  # effective weights as of now
        out = [
            self._backend(router, b, flowing, flows)
            for name, router in self.server.routers.items()
            if only is None or name == only
            for b in router.backends
        ]
        return backends_answer(request, out)

    async def update_backend(self, request: web.Request) -> web.Response:
        router = self._router(request.match_info["group"])
        name = request.match_info["name"]
        backend = router.by_name.get(name)
        if backend is None:
            raise ApiError(404, f"no backend {name!r} in group {router.name!r}", "not_found")
        body = await self._json_body(request)
        unknown = set(body) - {"state", "weight"}
        if unknown or not body:
            raise ApiError(400, "the body takes 'state' (up, drain, disabled) and/or 'weight'")
        state = body.get("state")
        weight = body.get("weight")
        if state is not None and state not in ("up", "drain", "disabled"):
            raise ApiError(400, f"state must be up, drain or disabled, not {state!r}")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT
        ):
            raise ApiError(400, f"weight must be an integer from 0 to {MAX_WEIGHT}")
        who = f"operator via the admin API from {request.remote}"
        if state is not None:
            router.set_admin(backend, State(state), who)
        if weight is not None:
            router.set_weight(backend, weight, who)
        return web.json_response(
            self._backend(router, backend, self.server.in_flight(), self.server.flows_by_backend())
        )

    # ------------------------------------------------------------------ affinity

    def _filter(self, request: web.Request) -> Filter:
        """The entries the query selects. `client` is an address (the entry of the network it
        is in, by each group's own netmask) or a prefix (the entries inside it)."""
        group = request.query.get("group")
        client = request.query.get("client")
        if group is not None:
            self._router(group)
        f = Filter(group, request.query.get("backend"))
        if client:
            try:
                if "/" in client:
                    f.span = key_span(ipaddress.ip_network(client, strict=False))
                else:
                    f.address = str(ipaddress.ip_address(client))
            except ValueError:
                raise ApiError(
                    400,
                    f"client must be an address or a prefix such as 203.0.113.0/24, not {client!r}",
                ) from None
        return f

    async def _select(self, f: Filter) -> AsyncIterator[tuple[Router, list[int]]]:
        """The keys `f` selects, by group (in name order), a slice at a time: a million entries
        are looked at a batch at a time, paced, never in one go (see dataplane/walk.py)."""
        for name in sorted(self.server.routers):
            router = self.server.routers.get(name)
            table = router.table if router is not None else None
            if router is None or table is None or (f.group is not None and name != f.group):
                continue
            if f.address is not None:
                key = router.keyer(f.address)
                e = table.get(key)
                if e is not None and f.backend in (None, e.backend and e.backend.name):
                    yield router, [key]
                continue
            lo, hi = f.span
            async for part in walk.batches(table.keys()):
                part = [k for k in part if lo <= k < hi]
                if f.backend is None:
                    part = [e.key for e in table.views(part)]
                else:
                    part = [
                        e.key
                        for e in table.views(part)
                        if e.backend is not None and e.backend.name == f.backend
                    ]
                yield router, part

    async def affinity(self, request: web.Request) -> web.StreamResponse:
        """A page of entries, sorted by group name and client, after `cursor` (the `next` of
        the page before); streamed, a slice at a time."""
        try:
            limit = max(0, min(int(request.query.get("limit", "10000")), MAX_LIST))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        after = parse_cursor(request.query.get("cursor"))
        f = self._filter(request)
        # Sorted runs of RUN keys each (a sort of that size is about a ms), merged lazily: the
        # page is the first `limit` keys of the merge, taken a batch at a time.
        runs: dict[str, list[list[int]]] = {}
        routers: dict[str, Router] = {}
        total = candidates = 0
        run: list[int] = []
        current: str | None = None

        def close_run(name: str) -> None:
            nonlocal run
            if run:
                run.sort()
                runs.setdefault(name, []).append(run)
                run = []

        async for router, keys in self._select(f):
            total += len(keys)
            if router.name != current:
                if current is not None:
                    close_run(current)
                current = router.name
                routers[current] = router
            if after is not None and router.name < after[0]:
                continue
            if after is not None and router.name == after[0]:
                keys = [k for k in keys if k > after[1]]
            candidates += len(keys)
            run += keys
            if len(run) >= RUN:
                close_run(router.name)
        if current is not None:
            close_run(current)
        page: list[tuple[Router, list[int]]] = []
        taken = 0
        pacer = walk.Pacer()
        for name in sorted(runs):
            merged = heapq.merge(*runs[name])
            keys = []
            while taken < limit:
                part = list(itertools.islice(merged, min(walk.BATCH, limit - taken)))
                if not part:
                    break
                keys += part
                taken += len(part)
                await pacer.pause()
            page.append((routers[name], keys))
            if taken >= limit:
                break
        last = next(((r.name, keys[-1]) for r, keys in reversed(page) if keys), None)
        nxt = cursor_of(*last) if last is not None and candidates > taken else None
        return await self._stream_entries(request, page, total, nxt)

    async def _stream_entries(
        self,
        request: web.Request,
        page: list[tuple[Router, list[int]]],
        total: int,
        nxt: str | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await self._frame_headers(request, response)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client left mid-answer: not our error
            await self._write_entries(response, page, total, nxt)
        return response

    async def _write_entries(
        self,
        response: web.StreamResponse,
        page: list[tuple[Router, list[int]]],
        total: int,
        nxt: str | None,
    ) -> None:
        await response.write(b'{"entries":[')
        flows = self.server.flows_by_entry()
        first = True
        pacer = walk.Pacer()
        for router, keys in page:
            table = router.table
            if table is None:
                continue
            for i in range(0, len(keys), walk.BATCH):
                rows = [
                    entry_json(router, e, flows.get(id(e), 0))
                    for e in table.views(keys[i : i + walk.BATCH])
                ]
                if rows:
                    text = json.dumps(rows, separators=(",", ":"))[1:-1]
                    await response.write((text if first else "," + text).encode())
                    first = False
                await pacer.pause()
        tail = {"total": total, "next": nxt}
        await response.write(b"]," + json.dumps(tail)[1:].encode())
        await response.write_eof()

    async def flush_affinity(self, request: web.Request) -> web.Response:
        f = self._filter(request)
        n = 0
        async for router, keys in self._select(f):
            table = router.table
            if table is not None:
                n += sum(1 for key in keys if table.forget(key))
        log.info("flushed %d affinity entries (%s) for %s", n, dict(request.query), request.remote)
        return web.json_response({"deleted": n})

    # ------------------------------------------------------------------ events, history, reload

    async def events(self, request: web.Request) -> web.Response:
        evs = list(self.server.monitor.events)[-200:]
        return web.json_response(
            {
                "events": [
                    {
                        "time": e.time,
                        "group": e.group,
                        "backend": e.backend,
                        "old": e.old,
                        "new": e.new,
                        "reason": e.reason,
                    }
                    for e in evs
                ]
            }
        )

    async def history(self, request: web.Request) -> web.Response:
        return web.json_response({"samples": [*self.server.history, self.server.sample()]})


def udp_json(st: UdpStats | None) -> dict[str, Any] | None:
    """A group's UDP counters (None: it has no UDP port)."""
    if st is None:
        return None
    return {
        "flows": st.flows,
        "opened": st.opened,
        "evicted": st.evicted,
        "unreachable": st.unreachable,
        "datagrams_in": st.datagrams_in,
        "datagrams_out": st.datagrams_out,
        "bytes_in": st.bytes_in,
        "bytes_out": st.bytes_out,
        "dropped": dict(st.drops),
        "quic": dict(st.quic),  # quic_lb: how datagrams that opened a flow were routed
        "migrations": st.migrations,  # quic_lb: flows a connection ID brought from elsewhere
    }


QUIC_FIELDS = ("config_id", "server_id_length", "nonce_length", "key_file")


def quic_lb_json(q: QuicLbSpec | None) -> dict[str, Any] | None:
    """A group's QUIC-LB configuration (never its key)."""
    if q is None:
        return None
    return {**{k: getattr(q, k) for k in QUIC_FIELDS}, "encrypted": q.key is not None}


def entry_json(router: Router, e: Entry[Backend], flows: int = 0) -> dict[str, Any]:
    """One affinity entry as the API shows it; times are seconds ago or to go. Its references
    are TCP connections and UDP flows (`flows` of them)."""
    p = router.spec.persistence
    table = router.table
    now = table.clock() if table is not None else 0.0
    repin = None
    if e.repin is not None:
        when, reason, was = e.repin
        repin = {"seconds_ago": round(now - when, 1), "reason": reason, "from": was}
    return {
        "group": router.name,
        "client": format_key(e.key, p.netmask, p.ipv6_prefix),
        "backend": e.backend.name if e.backend is not None else None,
        "connections": e.refs - flows,
        "flows": flows,
        "expires_in": None if e.refs else round(max(0.0, e.expires - now), 1),
        "pinned_for": round(now - e.since, 1) if e.since else None,
        "last_repin": repin,
    }


@dataclass
class Filter:
    """What an affinity query selects: a group, a backend, one client address or a span of
    keys (a prefix; all of them by default)."""

    group: str | None
    backend: str | None
    address: str | None = None
    span: tuple[int, int] = (0, 2 * V6_TAG)


def parse_cursor(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    key, sep, group = text.partition("@")
    try:
        if not sep or len(key) > 40:
            raise ValueError
        return group, int(key, 16)
    except ValueError:
        raise ApiError(400, f"cursor must be a page's next, not {text[:60]!r}") from None


def _listens_at(sock: socket.socket, host: str, port: int) -> bool:
    """Whether an inherited listener is the one the configuration asks for."""
    try:
        got = sock.getsockname()
        return bool(got[1] == port and ipaddress.ip_address(got[0]) == ipaddress.ip_address(host))
    except (OSError, ValueError, IndexError, TypeError):
        return False
