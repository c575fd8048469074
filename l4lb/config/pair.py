"""The top-level `ha` section: the HA pair this host is one of (runtime/pair.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from ..core.spec import AdminSpec, GroupSpec, HaSpec, is_ip
from .validator import _list_of, _scalars, _Validator
from .values import _beside, _bool, _host_port, _ip, _positive_duration, _text

_HA_KEYS = ("peer", "track_file", "addresses", "timeout", "idle_sync", "idle_after")


def _loopback(host: str) -> bool:
    return host == "localhost" or (is_ip(host) and ipaddress.ip_address(host).is_loopback)


def _ha(
    v: _Validator, node: yaml.Node, kw: dict[str, Any], groups: Sequence[GroupSpec]
) -> HaSpec | None:
    """The section, checked against the rest of the document (`kw`: the top-level keys)."""
    m = v.mapping(node, "ha", _HA_KEYS)
    if m is None:
        return None
    for key in ("peer", "track_file"):
        if key not in m:
            v.error(node, "ha", f"missing required key {key!r}")
            return None
    out: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "peer": _host_port,
        "track_file": _text,
        "timeout": _positive_duration,
        "idle_sync": _bool,
        "idle_after": _positive_duration,
    }
    if not _scalars(v, m, "ha", checks, out):
        return None
    admin: AdminSpec | None = kw.get("admin")
    if admin is None or admin.token_file is None:
        v.error(
            node, "ha", "needs admin.token_file: the peer link is the admin API, with its token"
        )
        return None
    if _loopback(admin.host):
        v.error(
            node,
            "ha",
            f"admin.listen is {admin.host}: the peer cannot reach this host's admin API there"
            " (listen on an address of the link between the two hosts)",
        )
        return None
    if kw.get("workers", 1) != 1:
        v.error(m["peer"][1], "ha", "an HA pair runs with workers: 1 (one process a host)")
        return None
    if "addresses" in m:
        addresses = _list_of(v, m["addresses"][1], "ha.addresses", _ip)
        if addresses is None:
            return None
    else:  # the listeners' own addresses and the groups' sources, where they name one
        addresses = []
        for g in groups:
            for a in (*g.listen, g.source or ""):
                if is_ip(a) and a not in ("0.0.0.0", "::") and a not in addresses:
                    addresses.append(a)
        if not addresses:
            v.error(
                node,
                "ha.addresses",
                "name the virtual addresses (every listener binds a wildcard address)",
            )
            return None
    host, port = out.pop("peer")
    return HaSpec(
        peer_host=host,
        peer_port=port,
        track_file=_beside(v.source, out.pop("track_file")),
        addresses=tuple(addresses),
        **out,
    )
