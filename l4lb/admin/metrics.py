"""Prometheus metrics, read at scrape time from the plain counters the hot path keeps.

Nothing here runs per connection: the relay, router and table bump ints on their own objects,
and this collector walks them when /metrics is asked for (on the event loop, so it never races
the loop's dicts). Labels are groups and backends only, never clients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import native
from ..core.backends import State
from ..version import __version__

if TYPE_CHECKING:
    from ..checks.monitor import HealthMonitor
    from ..core.routing import Router
    from ..dataplane.store import StoreStats
    from .view import Balancer


RELOADS_HELP = "Configuration reloads: result=ok (applied), failed (refused: nothing changed)"
UPGRADES_HELP = (
    "Upgrades (SIGUSR2, ctl upgrade): ok, handed over to this process's successor (its"
    " count goes on in the new process); failed, the process served on"
)
REFUSED_HELP = (
    "Admin requests refused, by reason: unauthorized, forbidden, not_found, bad_request (the"
    " API's), bad_header (not ASCII), bad_host (not this API's Host), header_timeout,"
    " body_timeout, too_many_connections, too_many_from_peer, too_large, and the kinds"
    " of malformed HTTP (bad_version, header_too_long, too_many_headers, bad_content_length,"
    " bad_chunking, bad_method, ...)"
)


class L4lbCollector(Collector):
    def __init__(self, server: Balancer) -> None:
        self.server = server

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the configuration; skip the registry's check

    def collect(self) -> Iterator[Metric]:
        s = self.server
        info = GaugeMetricFamily(
            "l4lb_build_info", "l4lb's version, and its build", labels=["version", "build"]
        )
        info.add_metric([__version__, "compiled" if native.is_compiled() else "pure"], 1)
        yield info
        yield from _traffic(s.routers)
        yield from _affinity(s.routers)
        yield from _backends(s.routers, s.in_flight())
        yield from _checks(s.routers, s.monitor)
        yield from _process(s)
        if s.udp_stats:
            yield from _udp_metrics(s)
        if s.store is not None:
            yield from _store_metrics(s.store.up, s.store.stats)


def _traffic(routers: Mapping[str, Router]) -> Iterator[Metric]:
    """Each group's connections: accepted, failed by reason, their connect and whole times."""
    accepted = CounterMetricFamily(
        "l4lb_connections_accepted", "Connections accepted", labels=["group"]
    )
    failed = CounterMetricFamily(
        "l4lb_connections_failed",
        "Connect attempts, TCP connections and UDP flows that failed (a refused flow counted"
        " here once, not among the dropped datagrams): reason=refused, timeout, error (one"
        " dial of a backend; the connection may still reach another), no_backend (none"
        " accepted: the client was closed), rejected (refused before routing: an untrusted"
        " or malformed PROXY header, an unusable address, a loop), denied (the group's allow"
        " and deny lists), source (a dial that could not come from the group's source: this"
        " host's capability or routing, not the backend), client_limit (its"
        " network over client_limits), descriptors (no descriptor left to dial with)",
        labels=["group", "reason"],
    )
    limited = GaugeMetricFamily(
        "l4lb_client_limit_networks",
        "Client networks the group's client_limits hold state for (open connections or a"
        " rate bucket not yet full)",
        labels=["group"],
    )
    sorry = CounterMetricFamily(
        "l4lb_sorry_connections", "Connections sent to the sorry server", labels=["group"]
    )
    sorry_serving = GaugeMetricFamily(
        "l4lb_sorry_serving", "1 while the sorry server serves the group", labels=["group"]
    )
    latency = HistogramMetricFamily(
        "l4lb_connect_duration_seconds",
        "Time to connect to a backend (the attempt that succeeded)",
        labels=["group"],
        unit="",
    )
    durations = HistogramMetricFamily(
        "l4lb_connection_duration_seconds",
        "How long connections lasted, from accept to close (those that reached a backend)",
        labels=["group"],
        unit="",
    )
    for g, router in routers.items():
        st = router.stats
        accepted.add_metric([g], st.accepted)
        failed.add_metric([g, "refused"], st.failed_refused)
        failed.add_metric([g, "timeout"], st.failed_timeout)
        failed.add_metric([g, "error"], st.connect_failures - st.failed_refused - st.failed_timeout)
        failed.add_metric([g, "no_backend"], st.no_backend)
        failed.add_metric([g, "rejected"], st.rejected)
        failed.add_metric([g, "descriptors"], st.descriptors)
        failed.add_metric([g, "client_limit"], st.client_limit)
        failed.add_metric([g, "denied"], st.denied)
        failed.add_metric([g, "source"], st.source)
        if router.limits is not None:
            limited.add_metric([g], router.limits.tracked)
        sorry.add_metric([g], st.sorry)
        sorry_serving.add_metric([g], int(router.sorry is not None and router.quorum.lost))
        latency.add_metric([g], st.connect.buckets(), st.connect.total)
        durations.add_metric([g], st.duration.buckets(), st.duration.total)
    yield from (accepted, failed, limited, sorry, sorry_serving, latency, durations)


def _affinity(routers: Mapping[str, Router]) -> Iterator[Metric]:
    """Each group's affinity table: entries, lookups, re-pins, evictions, expirations."""
    entries = GaugeMetricFamily(
        "l4lb_affinity_entries",
        "Affinity entries: state=active (connections open: never expire), idle (expire"
        " persistence.timeout after their last close)",
        labels=["group", "state"],
    )
    lookups = CounterMetricFamily(
        "l4lb_affinity_lookups",
        "Affinity lookups of new connections: result=hit (a live pin), miss (none, or expired)",
        labels=["group", "result"],
    )
    repins = CounterMetricFamily(
        "l4lb_affinity_repins",
        "Clients moved to another backend: reason=unavailable (the pinned one was down,"
        " disabled or removed), failed (it refused or timed out), returned (on_up: return"
        " brought the client back)",
        labels=["group", "reason"],
    )
    evictions = CounterMetricFamily(
        "l4lb_affinity_evictions", "Idle entries evicted by the bound", labels=["group"]
    )
    expirations = CounterMetricFamily(
        "l4lb_affinity_expirations", "Entries expired", labels=["group"]
    )
    unpinned = CounterMetricFamily(
        "l4lb_affinity_unpinned",
        "Connections routed without a pin (table full of busy entries)",
        labels=["group"],
    )
    for g, router in routers.items():
        st = router.stats
        repins.add_metric([g, "unavailable"], st.repins_unavailable)
        repins.add_metric([g, "failed"], st.repins_failed)
        repins.add_metric([g, "returned"], st.repins_returned)
        unpinned.add_metric([g], st.unpinned)
        table = router.table
        if table is not None:
            table.expire()
            entries.add_metric([g, "active"], table.active_count)
            entries.add_metric([g, "idle"], table.idle_count)
            lookups.add_metric([g, "hit"], table.hits)
            lookups.add_metric([g, "miss"], table.misses)
            evictions.add_metric([g], table.evictions)
            expirations.add_metric([g], table.expirations)
    yield from (entries, lookups, repins, evictions, expirations, unpinned)


def _backends(
    routers: Mapping[str, Router], in_flight: Mapping[tuple[str, str], list[int]]
) -> Iterator[Metric]:
    """Each backend: where it is, its state and weights, connections, bytes, failed dials."""
    backend_failures = CounterMetricFamily(
        "l4lb_backend_connect_failures",
        "Dials of this backend that failed: reason=refused (the backend said no: RST),"
        " timeout (no answer within connect_timeout), error (any other socket error)",
        labels=["group", "backend", "reason"],
    )
    active = GaugeMetricFamily(
        "l4lb_connections_active",
        "Open or dialing TCP connections and open UDP flows",
        labels=["group", "backend"],
    )
    conns = CounterMetricFamily(
        "l4lb_backend_connections", "Connections established", labels=["group", "backend"]
    )
    bytes_ = CounterMetricFamily(
        "l4lb_bytes",
        "Bytes relayed, open connections included: direction=in (client to backend), out"
        " (backend to client)",
        labels=["group", "backend", "direction"],
    )
    state = GaugeMetricFamily(
        "l4lb_backend_state",
        "1 for the backend's current state: up, down (its checks failed), drain (no new"
        " clients, pinned ones keep coming: the operator or weight 0), disabled (the"
        " operator: like down)",
        labels=["group", "backend", "state"],
    )
    weight = GaugeMetricFamily(
        "l4lb_backend_weight", "The backend's weight", labels=["group", "backend"]
    )
    where = GaugeMetricFamily(
        "l4lb_backend_info",
        "1 per backend: address (as resolved, or the name while it does not resolve),"
        " hostname (the DNS name it was given by, empty for an IP), backup (true: it takes new"
        " clients only when no other backend can)",
        labels=["group", "backend", "address", "hostname", "backup"],
    )
    effective = GaugeMetricFamily(
        "l4lb_backend_effective_weight",
        "The weight the weighted schedulers use now: below l4lb_backend_weight while the"
        " backend ramps up after coming back (slow_start)",
        labels=["group", "backend"],
    )
    for g, router in routers.items():
        if router.ramping:
            router.ramp()  # effective weights as of now
        for b in router.all_backends():
            labels = [g, b.name]
            where.add_metric([g, b.name, b.address, b.hostname, str(b.backup).lower()], 1)
            active.add_metric(labels, b.active)
            conns.add_metric(labels, b.connections)
            live_in, live_out = in_flight.get((g, b.name), (0, 0))
            bytes_.add_metric([*labels, "in"], b.bytes_in + live_in)
            bytes_.add_metric([*labels, "out"], b.bytes_out + live_out)
            weight.add_metric(labels, b.weight)
            effective.add_metric(labels, b.eff)
            current = b.state
            for st_name in State:
                state.add_metric([*labels, st_name.value], int(current is st_name))
            refused, timed_out = b.failed_refused, b.failed_timeout
            backend_failures.add_metric([*labels, "refused"], refused)
            backend_failures.add_metric([*labels, "timeout"], timed_out)
            backend_failures.add_metric(
                [*labels, "error"], b.connect_failures - refused - timed_out
            )
    yield from (backend_failures, active, conns, bytes_, state, weight, where, effective)


def _checks(routers: Mapping[str, Router], monitor: HealthMonitor) -> Iterator[Metric]:
    """Each backend's health checks: how many passed and failed, and how long they took."""
    checks = CounterMetricFamily(
        "l4lb_health_checks",
        "Health checks run: result=pass, fail",
        labels=["group", "backend", "result"],
    )
    check_time = HistogramMetricFamily(
        "l4lb_health_check_duration_seconds",
        "How long health checks took, passed or failed",
        labels=["group", "backend"],
        unit="",
    )
    for g, router in routers.items():
        for b in router.all_backends():
            labels = [g, b.name]
            passed, failed_n = monitor.counts.get((g, b.name), (0, 0))
            checks.add_metric([*labels, "pass"], passed)
            checks.add_metric([*labels, "fail"], failed_n)
            took = monitor.durations.get((g, b.name))
            if took is not None:
                check_time.add_metric(labels, took.buckets(), took.total)
    yield from (checks, check_time)


def _process(s: Balancer) -> Iterator[Metric]:
    """The process's own: unmatched marks, descriptors, loops, the log, reloads, the API."""
    unmatched = CounterMetricFamily(
        "l4lb_connections_unmatched_mark", "Connections whose firewall mark no group claims"
    )
    unmatched.add_metric([], s.plane.unmatched_marks)
    yield unmatched
    accept_errors = CounterMetricFamily(
        "l4lb_accept_errors",
        "Connections lost or refused for want of a resource, by errno: EMFILE when l4lb"
        " refused one near its descriptor limit (RLIMIT_NOFILE), or accept() failed",
        labels=["errno"],
    )
    for name, n in sorted(s.plane.accept_errors.items()):
        accept_errors.add_metric([name], n)
    yield accept_errors
    loops = CounterMetricFamily(
        "l4lb_connections_looped",
        "Connections refused because they came from l4lb's own outgoing socket (a backend"
        " that points at one of l4lb's listeners)",
    )
    loops.add_metric([], s.plane.loops)
    yield loops
    dropped = CounterMetricFamily(
        "l4lb_access_log_dropped",
        "Connection log lines dropped because the output could not keep up (or failed)",
    )
    dropped.add_metric([], sum(w.dropped for w in s.access_logs.values()))
    written = CounterMetricFamily("l4lb_access_log_lines", "Connection log lines written")
    written.add_metric([], sum(w.written for w in s.access_logs.values()))
    yield dropped
    yield written
    reloads = CounterMetricFamily("l4lb_reloads", RELOADS_HELP, labels=["result"])
    reloads.add_metric(["ok"], s.reloads_ok)
    reloads.add_metric(["failed"], s.reloads_failed)
    yield reloads
    upgrades = CounterMetricFamily("l4lb_upgrades", UPGRADES_HELP, labels=["result"])
    for result in ("ok", "failed"):
        upgrades.add_metric([result], s.upgrades.get(result, 0))
    yield upgrades
    yield from _pair_metrics(s)
    admin = CounterMetricFamily("l4lb_admin_requests_refused", REFUSED_HELP, labels=["reason"])
    for reason, n in sorted(s.admin_refused.items()):
        admin.add_metric([reason], n)
    yield admin


HANDOVER_HELP = (
    "An HA pair's hand-overs, connections by result: moved (given to the peer), taken (from"
    " the peer), kept (a hand-over failed: served on here), lost (could not move: not"
    " established), refused (a peer's hand-over this host dropped)"
)


def _pair_metrics(s: Balancer) -> Iterator[Metric]:
    pair = s.pair
    if pair is None:
        return
    moved = CounterMetricFamily("l4lb_handover_connections", HANDOVER_HELP, labels=["result"])
    for result, n in pair.counts.items():
        moved.add_metric([result], n)
    yield moved
    failovers = CounterMetricFamily(
        "l4lb_ha_failovers",
        "Times this host took the virtual addresses without a hand-over (the peer failed)",
    )
    failovers.add_metric([], pair.failovers)
    yield failovers
    active = GaugeMetricFamily("l4lb_ha_active", "1 while this host holds the virtual addresses")
    active.add_metric([], int(pair.active))
    yield active


def _udp_metrics(s: Balancer) -> Iterator[Metric]:
    flows = GaugeMetricFamily(
        "l4lb_udp_flows",
        "UDP flows open (a client address and port with a backend socket; each holds its"
        " affinity entry like an open connection)",
        labels=["group"],
    )
    opened = CounterMetricFamily("l4lb_udp_flows_opened", "UDP flows opened", labels=["group"])
    evicted = CounterMetricFamily(
        "l4lb_udp_flows_evicted",
        "UDP flows ended early because the group reached udp_max_flows (the idle longest first)",
        labels=["group"],
    )
    unreachable = CounterMetricFamily(
        "l4lb_udp_backend_unreachable",
        "ICMP errors (port unreachable) on flows' backend sockets: passive failures",
        labels=["group"],
    )
    dgrams = CounterMetricFamily(
        "l4lb_udp_datagrams",
        "UDP datagrams relayed: direction=in (client to backend), out (backend to client)",
        labels=["group", "direction"],
    )
    nbytes = CounterMetricFamily(
        "l4lb_udp_bytes",
        "UDP payload bytes relayed: direction=in (client to backend), out (backend to client)",
        labels=["group", "direction"],
    )
    drops = CounterMetricFamily(
        "l4lb_udp_dropped",
        "UDP datagrams dropped, by reason: no_backend (none accepted the flow), pending_full"
        " (held while the shared store settled the pin, and a few were held already),"
        " backend_busy (the backend socket's buffer was full), backend_error (the backend"
        " socket reported an error), client_send (the answer could not be sent),"
        " unvalidated (an answer past the 3 a client gets"
        " before its second datagram: reflection toward a forged source is bounded), looped"
        " (from one of l4lb's own flow sockets: its backend leads back, and is taken down),"
        " quic_unroutable (quic_lb: a short header whose connection ID no available backend"
        " owns, from a network with no pin), quic_malformed (quic_lb: too short for its"
        " connection ID), quic_full (quic_lb: its connection ID's server is at its max_conns)."
        " A refused new flow (denied, client_limit, ...) is in l4lb_connections_failed_total",
        labels=["group", "reason"],
    )
    for group, st in sorted(s.udp_stats.items()):
        flows.add_metric([group], st.flows)
        opened.add_metric([group], st.opened)
        evicted.add_metric([group], st.evicted)
        unreachable.add_metric([group], st.unreachable)
        dgrams.add_metric([group, "in"], st.datagrams_in)
        dgrams.add_metric([group, "out"], st.datagrams_out)
        nbytes.add_metric([group, "in"], st.bytes_in)
        nbytes.add_metric([group, "out"], st.bytes_out)
        for reason, n in st.drops.items():
            drops.add_metric([group, reason], n)
    yielded = CounterMetricFamily(
        "l4lb_udp_flows_yielded",
        "UDP flows ended (the idle longest first) so that a TCP connection could be accepted:"
        " the flows never hold more than half the descriptors, nor keep TCP out",
    )
    yielded.add_metric([], s.plane.yielded)
    yield from (flows, opened, evicted, unreachable, dgrams, nbytes, drops, yielded)
    yield from _quic_metrics(s)


def _quic_metrics(s: Balancer) -> Iterator[Metric]:
    """quic_lb's counters, for the groups that have it."""
    quic_groups = {name for name, r in s.routers.items() if r.quic is not None}
    quic = CounterMetricFamily(
        "l4lb_quic_packets",
        "quic_lb: datagrams that opened a flow, by how they were routed: cid (the server ID in"
        " the connection ID), pin (a client-chosen ID: the network's pin, else the scheduler),"
        " fallback (an unroutable ID: the same rule), unroutable (dropped), full (its server at"
        " its max_conns: dropped)",
        labels=["group", "route"],
    )
    migrations = CounterMetricFamily(
        "l4lb_quic_migrations",
        "quic_lb: flows a connection ID brought to its server from an address and port new to"
        " l4lb (a client that moved network, or a NAT that rebound it)",
        labels=["group"],
    )
    for group, st in sorted(s.udp_stats.items()):
        if group in quic_groups:
            for how, n in st.quic.items():
                quic.add_metric([group, how], n)
            migrations.add_metric([group], st.migrations)
    yield from (quic, migrations)


def _store_metrics(up: bool, st: StoreStats) -> Iterator[Metric]:
    gauge = GaugeMetricFamily("l4lb_store_up", "1 while the shared affinity store answers")
    gauge.add_metric([], int(up))
    yield gauge
    lookups = CounterMetricFamily(
        "l4lb_store_lookups",
        "Fresh pins settled with the shared store, by outcome",
        labels=["result"],
    )
    for result, n in (
        ("found", st.found),
        ("stored", st.stored),
        ("stale", st.stale),
        ("fallback", st.fallbacks),
    ):
        lookups.add_metric([result], n)
    yield lookups
    for name, doc, value in (
        ("l4lb_store_errors", "Shared store calls that failed or ran out of time", st.errors),
        ("l4lb_store_outages", "Times the shared store became unavailable", st.outages),
        ("l4lb_store_writes", "Pins written to the shared store by the flusher", st.writes),
        ("l4lb_store_reconciled", "Pins written back when the store returned", st.reconciled),
    ):
        c = CounterMetricFamily(name, doc)
        c.add_metric([], value)
        yield c


def make_registry(server: Balancer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(L4lbCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
