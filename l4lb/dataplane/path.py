"""The path every new TCP connection and UDP flow takes, whatever its transport: admission, then
the choose-and-connect loop. relay.py and udp.py keep only what differs: how they refuse (a reset,
a dropped datagram), how they hold the client, and the connect step (a dial, a connected socket).

Theory of operation
-------------------
Admission (`admit`) judges a client address for a group, in this order, each check counted in
the group's `GroupStats` alike for both transports:

1. the keyer: an address that cannot be keyed is `REJECTED` (`rejected`, a line a second);
2. the group's allow and deny lists (`DENIED`, `denied`), unless a trusted proxy speaks for
   itself (PROXY LOCAL or UNKNOWN);
3. the transport's own test (`vet`: a QUIC datagram's connection ID, UDP only), which drops
   and counts what fails by itself (`DROPPED`);
4. `client_limits` (`CLIENT_LIMIT`, `client_limit`, a line a second): before any room is
   made, so that a network over its limit costs no other client its flow;
5. a descriptor for it (`DESCRIPTORS`, `descriptors` and `accept_errors`), making room by ending
   the UDP flows idle longest (a flow: first its group's, at its `udp_max_flows`).

Nothing is spent before the last check passes but the client network's limit slot, which a
refusal at 5 gives back. `open_route` then takes the route (`Router.begin`, provisional for a
flow until its client proves its address), and the connection or flow is `DIALING`.

`connect` runs the loop: the backend a QUIC ID steered the flow to, else the router's next
(`Router.next_backend`: pin or scheduler; a TCP connection may wait once for its full pinned
backend's slot), a fresh pin settled with the shared store first, then the transport's
connect step. A refusal or timeout is the backend's failure (`Router.failed`, passive health)
and the loop goes on to the next; a failure of this host (no descriptor, a `source` it cannot
dial from) ends it at once without blaming the backend or the pin. It returns a named outcome
(REACHED, NO_BACKEND, SOURCE, DESCRIPTORS); on REACHED the record holds the backend, the connect
time and, when the group logs, the line's routing (`Router.connected`), and the step what it
made.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..core.accounting import reached
from ..core.backends import Backend
from ..core.connection import DIALING, Conn
from ..core.route import Route
from ..core.routing import Router
from ..core.throttle import Throttle, held_note
from .dialer import RESOURCE_ERRNOS, Cancellable, Step
from .transparent import SourceError

if TYPE_CHECKING:
    from ..core.flowstats import UdpStats
    from .context import DataPlane

log = logging.getLogger("l4lb.path")
_throttle = Throttle()  # a line a second at most per kind and group, however many clients


# Why admission refused a client, as its termination and its counter name it (module constants:
# compiled, each is a literal, where an enum member is a lookup on a Python class).
REJECTED: Final = "rejected"
DENIED: Final = "denied"
DROPPED: Final = "dropped"  # by the transport's own test, which counted it
CLIENT_LIMIT: Final = "client_limit"
DESCRIPTORS: Final = "descriptors"
REFUSALS: Final = (REJECTED, DENIED, DROPPED, CLIENT_LIMIT, DESCRIPTORS)


def admit(
    plane: DataPlane,
    router: Router,
    conn: Conn,
    host: str,
    *,
    screen: bool = True,
    flows: UdpStats | None = None,
    vet: Callable[[Router, int], bool] | None = None,
) -> str:
    """Admit `conn`, a new connection (`flows` None) or a new flow of the group whose UDP
    counters are `flows`, from client address `host`: its client network's key set, "" when
    admitted, else why it is refused (one of `REFUSALS`: see the theory above). `screen`
    False: the access lists do not judge it."""
    try:
        key = router.keyer(host)
    except (TypeError, ValueError, OSError):
        router.stats.rejected += 1
        warn("rejected", router, f"rejected a client: an unusable address {host!r}")
        return REJECTED
    admits = router.admits
    if screen and admits is not None and not admits(host):
        router.stats.denied += 1
        return DENIED
    if vet is not None and not vet(router, key):
        return DROPPED
    limits = router.limits
    if limits is not None:
        over = limits.admit(key)
        if over is not None:
            router.stats.client_limit += 1
            which = over.replace("_", " ")
            warn(over, router, f"a client network over its {which} limit: refused")
            return CLIENT_LIMIT
    if not (plane.room_for_flow(router, flows) if flows is not None else plane.room_for_tcp()):
        # Out of descriptors (or about to be): refused now, counted, rather than let the loop
        # drop what it can no longer accept without a word.
        if limits is not None:
            limits.release(key)
        router.stats.descriptors += 1
        what = "a UDP flow" if flows is not None else "a connection"
        plane.accept_error("EMFILE", f"refused {what}: the descriptor limit is near")
        return DESCRIPTORS
    conn.key = key
    return ""


def open_route(router: Router, conn: Conn) -> Route:
    """An admitted connection or flow takes its route (a flow's entry is provisional until
    its client proves its address: see affinity.py) and starts dialing."""
    route = router.begin(conn.key, provisional=conn.udp)
    conn.route = route
    conn.phase = DIALING
    return route


def warn(kind: str, router: Router, what: str) -> None:
    held = _throttle.allow((kind, router.name))
    if held is not None:
        log.warning("group %s: %s%s", router.name, what, held_note(held))


# ---------------------------------------------------------------------- choose and connect


# What `connect` came to, as a termination names it when no backend was reached (DESCRIPTORS,
# above, is one too: this host had no descriptor left to dial with).
REACHED: Final = "reached"
NO_BACKEND: Final = "no_backend"  # every backend the router offered failed, or none could take it
SOURCE: Final = "source"  # this host could not dial from the group's `source`


async def connect(
    plane: DataPlane,
    router: Router,
    conn: Conn,
    step: Step,
    *,
    wait: bool,
    task: Cancellable | None = None,
) -> str:
    """Choose and connect a backend for `conn` (admitted: `open_route`), see the theory above:
    REACHED (what the step made is `step.made`), NO_BACKEND, SOURCE or DESCRIPTORS;
    `wait`: a full pinned backend's slot may be waited for (TCP; a datagram does not wait);
    `task`: what runs this (a Task or a `Stepper`), which the step's deadline cancels."""
    route = conn.route
    assert route is not None
    store = plane.store
    loop = plane.loop
    while True:
        if route.steered and route.backend is not None:
            backend = route.backend  # a QUIC connection ID chose it
        else:
            choice = router.next_backend(route, wait=wait)
            if choice is None:
                full = route.wait_for
                if full is None:
                    router.stats.no_backend += 1
                    return NO_BACKEND
                router.waited(route)
                await plane.slots.wait(full, router.spec.queue_timeout)
                continue
            backend = choice
            if store is not None and backend is not router.sorry:
                if route.fresh:
                    backend = await store.settle(router, route, backend)
                elif store.pending:
                    backend = await store.follow(router, route, backend)
        port = backend.udp_port_for(conn.port) if conn.udp else backend.port_for(conn.port)
        t0 = loop.time()
        timed = task is not None and step.timeout > 0
        if timed:
            plane.deadlines.add(loop, task, t0 + step.timeout)  # type: ignore[arg-type]
        try:
            made = await step.attempt(backend, port)
        except asyncio.CancelledError:
            if not timed or not _expired(plane, task):  # type: ignore[arg-type]
                raise  # the client left
            failure: str | None = _failed(plane, router, route, backend, TimeoutError())
        except SourceError as error:
            _source_failed(router, route, backend, str(error))
            return SOURCE
        except OSError as exc:
            failure = _failed(plane, router, route, backend, exc)
        else:
            step.made = made
            _reached(router, conn, backend, port, t0=t0, now=loop.time())
            return REACHED
        finally:
            if timed:
                plane.deadlines.waiting.pop(task, None)  # type: ignore[arg-type]
        if failure is not None:
            return failure


def _expired(plane: DataPlane, task: Cancellable) -> bool:
    """A cancel of `task` is the deadline sweep's alone (then the dial timed out), not the
    client's leaving: the sweep marked it, and its cancellation count says no other came."""
    expired = plane.deadlines.expired
    if task not in expired:
        return False
    expired.discard(task)
    return task.uncancel() == 0


def _reached(
    router: Router, conn: Conn, backend: Backend, port: int, *, t0: float, now: float
) -> None:
    """The attempt at `backend` begun at loop time `t0` succeeded at `now`: counted, the pin
    confirmed."""
    route = conn.route
    assert route is not None
    router.stats.connect.observe(now - t0)
    conn.backend = backend
    conn.connected_at = now
    affinity = router.connected(route, backend)
    if router.log is not None:  # (before the re-pin's reason is let go)
        conn.routed = reached(router.name, conn, route, affinity, port)
    router.held(route, backend)


def _failed(
    plane: DataPlane, router: Router, route: Route, backend: Backend, exc: OSError
) -> str | None:
    """An attempt at `backend` failed with `exc`: the host's failure that ends the loop
    (neither the backend nor the pin blamed: no other backend would do better), or None when
    it is the backend's (counted, passive health) and the next is worth a try."""
    if exc.errno in RESOURCE_ERRNOS:
        router.given_up(route, backend, source=False)
        name = errno.errorcode[exc.errno]
        plane.accept_error(name, "no descriptor to dial a backend with")
        return DESCRIPTORS
    if router.spec.source == "client" and _hosts_failure(router, route, backend, exc):
        return SOURCE
    router.failed(route, backend, _reason(exc))
    log.debug(
        "group %s: backend %s (%s) failed: %s",
        router.name,
        backend.name,
        backend.address,
        exc.strerror or type(exc).__name__,
    )
    if backend.waiting:
        plane.slots.wake(backend)
    return None


def lost(router: Router, route: Route, backend: Backend, exc: OSError) -> None:
    """A flow's backend answered one of its datagrams with an ICMP error: a passive failure of
    that backend, as a refused dial is (the flow is then routed again: `connect`)."""
    router.failed(route, backend, _reason(exc))


def _hosts_failure(router: Router, route: Route, backend: Backend, exc: OSError) -> bool:
    """An attempt from the client's own address failed: whether it is this host's failure
    (counted as `source`, the backend not blamed; no other backend would do better)."""
    if not router.source_ready:
        # Unanswered for want of the way back on this host (said at start).
        _source_failed(router, route, backend, "the way back for the answers is missing")
        return True
    if isinstance(exc, TimeoutError) and router.vouched(backend):
        # Its answer never came, from a backend that l4lb's own check (from l4lb's own
        # address) finds up: the answer went the client's way, not back through this host (a
        # policy rule gone since the start, or a client network without the way back).
        _source_failed(
            router,
            route,
            backend,
            f"no answer from {backend.name}, which l4lb's own check finds up: the answers"
            " to this client do not come back through this host",
        )
        return True
    return False


def _source_failed(router: Router, route: Route, backend: Backend, why: str) -> None:
    router.given_up(route, backend, source=True)
    held = _throttle.allow(("source", router.name))
    if held is not None:
        log.warning(
            "group %s: a dial from source %s failed: %s (counted as"
            ' l4lb_connections_failed_total{reason="source"}; see docs/deployment.md)%s',
            router.name,
            router.spec.source,
            why,
            held_note(held),
        )


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "refused"
    return "error"
