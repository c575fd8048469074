"""The admin API of a supervisor: one answer for the whole process, made from every worker's.

Each worker serves the ordinary admin API (api.py) on a private Unix socket; this front asks
all of them and merges, so the URLs, bodies and metric names are the same with one process or
many. Counters add up; per-client entries are disjoint (a client's key lives in one worker) and
are concatenated; settings that every worker holds alike (states, weights) come from the first.
Changes are authorized here, then sent to every worker; a reload is the supervisor's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from ..core.spec import AdminSpec
from .api import MAX_LIST, ROUTES, ApiBase, backends_csv
from .lifecycle import ApiError
from .metrics import REFUSED_HELP, RELOADS_HELP, UPGRADES_HELP
from .paging import client_key, cursor_of

log = logging.getLogger("l4lb.admin")
ASK_TIMEOUT = 10.0  # seconds for every worker to answer one request

# Gauges that every worker reports alike: the first worker's value, not the sum.
SHARED_GAUGES = {
    "l4lb_build_info",
    "l4lb_sorry_serving",
    "l4lb_backend_state",
    "l4lb_backend_weight",
    "l4lb_backend_effective_weight",
    "l4lb_health_check_duration_seconds",
    "l4lb_store_up",
    "python_info",
}
OWN_METRICS = {
    "l4lb_reloads",
    "l4lb_upgrades",
    "l4lb_admin_requests_refused",
}  # the supervisor's, not summed
# Summed over workers ("peak": the sum of each worker's peak, an upper bound of the whole's).
BACKEND_SUMS = (
    "active",
    "connections",
    "connect_failures",
    "bytes_in",
    "bytes_out",
    "peak",
    "waiting",
    "flows",
)


class _Process(Protocol):
    @property
    def pid(self) -> int: ...


class _Channel(Protocol):
    @property
    def closed(self) -> bool: ...


class Member(Protocol):
    """One worker, as the front API asks it (`workers.supervisor.Member`)."""

    @property
    def index(self) -> int: ...

    @property
    def proc(self) -> _Process: ...

    @property
    def channel(self) -> _Channel: ...

    @property
    def ready(self) -> asyncio.Event: ...

    @property
    def admin_path(self) -> str | None: ...


class Fleet(Protocol):
    """The workers of one balancer, as the front API reads them (`workers.Fleet`)."""

    @property
    def ready(self) -> bool: ...

    @property
    def workers(self) -> Sequence[Member | None]: ...

    @property
    def restarts(self) -> int: ...

    @property
    def restarts_by(self) -> Mapping[str, int]: ...

    @property
    def reloads_ok(self) -> int: ...

    @property
    def reloads_failed(self) -> int: ...

    @property
    def started_at(self) -> float: ...

    @property
    def upgrades(self) -> Mapping[str, int]: ...

    @property
    def last_upgrade(self) -> Mapping[str, object] | None: ...

    async def upgrade(self) -> str: ...

    @property
    def admin_refused(self) -> dict[str, int]: ...  # the API counts its refusals here

    def live_workers(self) -> Sequence[Member]: ...

    async def reload_from_file(self) -> list[str]: ...


class FrontAdmin(ApiBase):
    routes = (*ROUTES, ("GET", "/api/v1/workers", "workers"))

    def __init__(self, sup: Fleet, spec: AdminSpec) -> None:
        super().__init__(spec, sup.admin_refused, None, sup.reload_from_file, sup.upgrade)
        self.sup = sup
        self._sessions: dict[int, tuple[aiohttp.ClientSession, int]] = {}  # by worker: pid
        self._closing: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        for session, _pid in self._sessions.values():
            await session.close()
        self._sessions.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await super().stop()

    def _session(self, w: Member) -> aiohttp.ClientSession:
        """One session per worker process: a worker started again gets a new one, so that no
        kept-alive connection to its predecessor is reused."""
        assert w.admin_path is not None
        session, pid = self._sessions.get(w.index, (None, 0))
        if session is None or session.closed or pid != w.proc.pid:
            if session is not None:  # closed in the background; nothing waits on it
                closing = asyncio.get_running_loop().create_task(session.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=w.admin_path, limit=16),
                timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT),
            )
            self._sessions[w.index] = (session, w.proc.pid)
        return session

    async def _ask(self, request: web.Request, body: bytes | None = None) -> list[tuple[int, Any]]:
        """(status, JSON or text) from every live worker, in worker order."""
        return [(status, data) for _, status, data in await self._ask_each(request, body)]

    async def _ask_each(
        self, request: web.Request, body: bytes | None = None
    ) -> list[tuple[int, int, Any]]:
        """(worker index, status, JSON or text) from every live worker."""
        headers = {}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        if body is not None:
            headers["Content-Type"] = "application/json"

        async def one(w: Member) -> tuple[int, int, Any]:
            url = f"http://worker{request.rel_url}"
            async with self._session(w).request(
                request.method, url, data=body, headers=headers
            ) as r:
                if r.content_type == "application/json":
                    return w.index, r.status, await r.json()
                return w.index, r.status, await r.text()

        workers = [w for w in self.sup.live_workers() if w.ready.is_set()]
        if not workers:
            raise ApiError(503, "no worker is serving right now", "unavailable")
        try:
            return await asyncio.gather(*(one(w) for w in workers))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(503, f"a worker did not answer: {exc}", "unavailable") from None

    def _first_error(self, answers: list[tuple[int, Any]]) -> web.Response | None:
        """A worker's refusal, passed on (and counted here, where it is reported)."""
        for status, data in answers:
            if status >= 400:
                self._refuse(
                    {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(
                        status, "bad_request"
                    )
                )
                return web.json_response(data, status=status)
        return None

    # ------------------------------------------------------------------ pages

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.sup.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def workers(self, request: web.Request) -> web.Response:
        out = [
            {
                "index": i,
                "pid": w.proc.pid if w is not None else None,
                "ready": w is not None and w.ready.is_set() and not w.channel.closed,
            }
            for i, w in enumerate(self.sup.workers)
        ]
        return web.json_response({"workers": out, "restarts": self.sup.restarts})

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self._ask_each(request)
        texts = [
            (str(i), data) for i, status, data in answers if status == 200 and isinstance(data, str)
        ]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_metrics(texts), self.sup))
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ the API

    async def groups(self, request: web.Request) -> web.Response:
        answers = await self._ask(request)
        error = self._first_error(answers)
        if error is not None:
            return error
        first = answers[0][1]
        for _, data in answers[1:]:
            for g, other in zip(first["groups"], data["groups"], strict=False):
                for k in g["stats"]:
                    g["stats"][k] += other["stats"][k]
                for k in ("entries", "active_entries"):
                    g["persistence"][k] += other["persistence"][k]
                if g.get("udp") and other.get("udp"):
                    for k, v in other["udp"].items():
                        if isinstance(v, dict):  # dropped, quic: by reason
                            for r, n in v.items():
                                g["udp"][k][r] = g["udp"][k].get(r, 0) + n
                        else:
                            g["udp"][k] += v
        first["uptime"] = _uptime(self.sup)
        first["started_at"] = self.sup.started_at
        first["last_upgrade"] = self.sup.last_upgrade
        first["workers"] = len(answers)
        return web.json_response(first)

    async def backends(self, request: web.Request) -> web.Response:
        csv = request.query.get("format") == "csv"
        if csv:  # the workers answer JSON, merged here, then made CSV
            rest = {k: v for k, v in request.rel_url.query.items() if k != "format"}
            request = request.clone(rel_url=request.rel_url.with_query(rest))
        answers = await self._ask(request)
        error = self._first_error(answers)
        if error is not None:
            return error
        rows = _sum_backends([data["backends"] for _, data in answers])
        if csv:
            return web.Response(text=backends_csv(rows), content_type="text/csv")
        return web.json_response({"backends": rows})

    async def update_backend(self, request: web.Request) -> web.Response:
        answers = await self._ask(request, await self._read_body(request))
        error = self._first_error(answers)
        if error is not None:
            return error
        return web.json_response(_sum_backends([[data] for _, data in answers])[0])

    async def affinity(self, request: web.Request) -> web.Response:
        each = await self._ask_each(request)
        answers = [(status, data) for _, status, data in each]
        error = self._first_error(answers)
        if error is not None:
            return error
        try:
            limit = max(0, min(int(request.query.get("limit", "10000")), MAX_LIST))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        # Each worker answered its page after the cursor; the fleet's page is the first
        # `limit` of their union, in the same order (group, then client).
        entries = sorted(
            (dict(e, worker=w) for w, _, data in each for e in data["entries"]),
            key=lambda e: (e["group"], client_key(e["client"])),
        )
        more = len(entries) > limit or any(data.get("next") for _, data in answers)
        entries = entries[:limit]
        last = entries[-1] if entries else None
        nxt = cursor_of(last["group"], client_key(last["client"])) if more and last else None
        total = sum(data["total"] for _, data in answers)
        return web.json_response({"entries": entries, "total": total, "next": nxt})

    async def flush_affinity(self, request: web.Request) -> web.Response:
        answers = await self._ask(request)
        return self._first_error(answers) or web.json_response(
            {"deleted": sum(data["deleted"] for _, data in answers)}
        )

    async def events(self, request: web.Request) -> web.Response:
        """Every worker checks its backends, so one change is seen by each: shown once."""
        answers = await self._ask(request)
        error = self._first_error(answers)
        if error is not None:
            return error
        seen: dict[tuple[Any, ...], float] = {}
        out = []
        for e in sorted((e for _, d in answers for e in d["events"]), key=lambda e: e["time"]):
            what = (e["group"], e["backend"], e["old"], e["new"])
            if what in seen and e["time"] - seen[what] < 5.0:
                continue
            seen[what] = e["time"]
            out.append(e)
        return web.json_response({"events": out[-200:]})

    async def history(self, request: web.Request) -> web.Response:
        answers = await self._ask(request)
        error = self._first_error(answers)
        if error is not None:
            return error
        series = [data["samples"] for _, data in answers]
        n = min(len(s) for s in series)
        samples = []
        for i in range(n):  # the workers' newest samples, aligned from the end
            parts = [s[len(s) - n + i] for s in series]
            merged = parts[0]
            for p in parts[1:]:
                merged = _add(merged, p)
            merged["time"] = parts[0]["time"]
            samples.append(merged)
        return web.json_response({"samples": samples})


def _uptime(sup: Fleet) -> float:
    import time

    return time.time() - sup.started_at


def _add(a: Any, b: Any) -> Any:
    """Two workers' samples summed, number by number."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(v, b[k]) if k in b else v for k, v in a.items()}
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    return a


def _sum_backends(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    first = per_worker[0]
    for other in per_worker[1:]:
        for b, o in zip(first, other, strict=False):
            for k in BACKEND_SUMS:
                b[k] += o[k]
            for k in b["failures"]:
                b["failures"][k] += o["failures"][k]
    return first


def merge_metrics(texts: list[tuple[str, str]]) -> list[Metric]:
    """Sum the workers' samples (each `(worker index, text)`) by name and labels
    (SHARED_GAUGES: the first worker's); a process's own metrics (`process_*`: its memory,
    CPU, descriptors) are each worker's, labelled `worker`, never summed."""
    merged: dict[str, Metric] = {}
    index: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            if family.name in OWN_METRICS:
                continue
            mine = merged.get(family.name)
            if mine is None:
                mine = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = mine
            own = family.name.startswith("process_")
            for s in family.samples:
                if own:
                    s = s._replace(labels={**s.labels, "worker": worker})
                where = (s.name, tuple(sorted(s.labels.items())))
                at = index.get(where)
                if at is None:
                    index[where] = len(mine.samples)
                    mine.samples.append(s)
                elif family.name not in SHARED_GAUGES and not s.name.endswith("_created"):
                    old = mine.samples[at]
                    mine.samples[at] = old._replace(value=old.value + s.value)
    return list(merged.values())


class _Merged:
    """A collector over the merged families, and the supervisor's own."""

    def __init__(self, families: list[Metric], sup: Fleet) -> None:
        self.families = families
        self.sup = sup

    def collect(self) -> list[Metric]:
        sup = self.sup
        workers = GaugeMetricFamily("l4lb_workers", "Worker processes serving")
        workers.add_metric([], len([w for w in sup.live_workers() if w.ready.is_set()]))
        restarts = CounterMetricFamily(
            "l4lb_worker_restarts",
            "Workers started again: reason=exited (it ended), unresponsive (it answered no"
            " ping for three seconds, stopped or stuck, and was killed)",
            labels=["reason"],
        )
        for reason, n in sorted(sup.restarts_by.items()):
            restarts.add_metric([reason], n)
        reloads = CounterMetricFamily("l4lb_reloads", RELOADS_HELP, labels=["result"])
        reloads.add_metric(["ok"], sup.reloads_ok)
        reloads.add_metric(["failed"], sup.reloads_failed)
        upgrades = CounterMetricFamily("l4lb_upgrades", UPGRADES_HELP, labels=["result"])
        for result in ("ok", "failed"):
            upgrades.add_metric([result], sup.upgrades.get(result, 0))
        refused = CounterMetricFamily(
            "l4lb_admin_requests_refused", REFUSED_HELP, labels=["reason"]
        )
        for reason, n in sorted(sup.admin_refused.items()):
            refused.add_metric([reason], n)
        return [*self.families, workers, restarts, reloads, upgrades, refused]
