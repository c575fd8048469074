"""Applying a reloaded group to its running router: backends matched by name, so that pins to
the ones that remain stay; removed ones marked, so that their pins move on. Pure."""

from __future__ import annotations

import random
from collections.abc import Callable

from .affinity import AffinityTable
from .backends import Backend
from .diff import changes as config_changes
from .health import Quorum
from .keys import make_keyer
from .limits import ClientLimits
from .quicroute import QuicRouting
from .routing import Router, access_test, trusted_test
from .schedulers import make_scheduler
from .spec import BackendSpec, GroupSpec
from .states import checked_of


def _renamed(
    router: Router, bs: BackendSpec, wanted: set[str], previous: dict[str, BackendSpec]
) -> Backend | None:
    """A name that went from one address to several, or back (`NAME` and `NAME-ADDRESS`,
    l4lb/config/names.py): the backend at the same address, of the same name, keeps its pins."""
    for b in router.backends:
        if (
            b.hostname == bs.hostname
            and b.address == bs.address
            and b.name not in wanted
            and b.name in previous
            and not b.removed
        ):
            return b
    return None


def _backends(router: Router, spec: GroupSpec, changes: list[str]) -> list[Backend]:
    """The reloaded group's backends, the running ones kept by name (or by address, renamed)."""
    previous = {b.name: b for b in router.spec.backends}
    backends: list[Backend] = []
    wanted = {bs.name for bs in spec.backends}
    for i, bs in enumerate(spec.backends):
        b = router.by_name.get(bs.name)
        if b is None and bs.hostname:
            b = _renamed(router, bs, wanted, previous)
            if b is not None:
                changes.append(f"backend {b.name} is now {bs.name} ({bs.hostname})")
                previous[bs.name] = previous.pop(b.name)
                b.rename(bs.name)
        if b is None:
            b = Backend(bs, i)
            b.changed_at = router.wall()
            changes.append(f"backend {bs.name} added")
        else:
            was = previous[bs.name]
            if bs != was:
                what = ", ".join(config_changes(was, bs, skip=("unresolved",)))
                changes.append(f"backend {bs.name} changed: {what}")
            b.update(bs, was, i)
            if bs.unresolved and not was.unresolved:
                router.set_health(b, False, bs.unresolved)
            elif was.unresolved and not bs.unresolved:  # (its checks, if any, then judge)
                router.set_health(b, True, f"{bs.hostname} resolves to {bs.address}")
        backends.append(b)
    names = {b.name for b in backends}
    for b in router.backends:
        if b.name not in names:
            b.remove()
            changes.append(f"backend {b.name} removed")
    kept = [b.name for b in backends if b.name in previous]
    if kept != [b.name for b in router.backends if b.name in names]:
        changes.append("backends reordered")
    return backends


def reconfigure(
    router: Router, spec: GroupSpec, clock: Callable[[], float], rng: random.Random | None
) -> list[str]:
    """Apply a reloaded group to `router`; what changed, a line each."""
    old = router.spec
    router.clock = clock
    changes = config_changes(old, spec, skip=("name", "backends"))
    backends = _backends(router, spec, changes)
    router.backends = backends
    router.by_name = {b.name: b for b in backends}
    if spec.sorry_server != old.sorry_server:
        router.sorry = Backend(spec.sorry_server) if spec.sorry_server is not None else None
    primaries = router.primaries()
    if spec.scheduler != old.scheduler or [b.name for b in primaries] != [
        b.name for b in old.backends if not b.backup
    ]:
        router.scheduler = make_scheduler(spec.scheduler, primaries, rng)
    else:
        router.scheduler.backends = primaries  # type: ignore[attr-defined]
        router.scheduler.rebuild()
    router.backups = [b for b in backends if b.backup]
    p = spec.persistence
    router.keyer = make_keyer(p.netmask, p.ipv6_prefix)
    if not p.enabled:
        router.table = None
    elif router.table is None:
        router.table = AffinityTable(p.timeout, p.max_entries, clock)
    else:
        router.table.timeout = p.timeout
        router.table.max_entries = p.max_entries
    router.quorum = Quorum(spec.quorum, spec.hysteresis, router.up_count())
    router.proxy_trusted = trusted_test(spec)
    router.admits = access_test(spec)
    if spec.client_limits is None:
        router.limits = None
    elif router.limits is None:
        router.limits = ClientLimits(spec.client_limits, clock)
    elif spec.client_limits != old.client_limits:
        router.limits.reconfigure(spec.client_limits)
    router.returns = spec.on_up == "return"
    router.spec = spec
    router.checked = checked_of(spec)
    router.quic = QuicRouting(spec.quic_lb, backends) if spec.quic_lb is not None else None
    return changes
