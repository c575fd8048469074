"""The whole document: the top-level keys (admin, the shared store, ...), then each group, then
the checks across groups."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import yaml

from ..core.spec import MAX_WORKERS, AdminSpec, Config, GroupSpec, KernelMarksSpec, StoreSpec
from .crosscheck import _check_loops, _listen_overlaps
from .groups import _LOG_OFF, _access_log, _group
from .pair import _ha
from .validator import _list_of, _scalars, _Validator
from .values import (
    _NAME_RE,
    _beside,
    _bool,
    _budget,
    _choice,
    _duration,
    _host_name,
    _host_port,
    _int_in,
    _positive_duration,
    _redis_url,
    _text,
    token_problem,
)

_TOP_KEYS = (
    "groups",
    "workers",
    "affinity_store",
    "shutdown_timeout",
    "admin",
    "state_file",
    "state_interval",
    "kernel_marks",
    "access_log",
    "resolve_interval",
    "ha",
)


_ADMIN_KEYS = (
    "listen",
    "token_file",
    "request_timeout",
    "max_connections",
    "max_connections_per_peer",
    "read_token",
    "hosts",
)
_ADMIN_SCALARS: dict[str, Callable[[Any], Any]] = {
    "request_timeout": _positive_duration,
    "max_connections": _int_in(1, 100_000),
    "max_connections_per_peer": _int_in(1, 100_000),
    "read_token": _bool,
}
TOKEN_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE makes one"


def _admin(v: _Validator, node: yaml.Node, path: str) -> AdminSpec | None:
    m = v.mapping(node, path, _ADMIN_KEYS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if not _scalars(v, m, path, _ADMIN_SCALARS, kw):
        return None
    if "listen" in m:
        hp = v.field(m["listen"][1], f"{path}.listen", _host_port)
        if hp is None:
            return None
        kw["host"], kw["port"] = hp
    if "hosts" in m:
        hosts = _list_of(v, m["hosts"][1], f"{path}.hosts", _host_name)
        if hosts is None:
            return None
        kw["hosts"] = tuple(hosts)
    if "token_file" in m:
        tf = _token_file(v, m["token_file"][1], f"{path}.token_file")
        if tf is None:
            return None
        kw["token_file"] = tf
    spec = AdminSpec(**kw)
    if not spec.read_token and not _is_loopback(spec.host):
        v.warn(
            m["listen"][1] if "listen" in m else node,
            f"{path}.listen",
            f"the admin API listens on {spec.host}, beyond loopback, and anyone who reaches it"
            " can read it (client addresses in /api/v1/affinity): set read_token: true with a"
            " token_file, or listen on 127.0.0.1",
        )
    if spec.read_token and spec.token_file is None:
        v.error(m["read_token"][1], f"{path}.read_token", "needs a token_file")
        return None
    return spec


def _token_file(v: _Validator, node: yaml.Node, path: str) -> str | None:
    """The token file's path, once it holds a token fit to be a secret."""
    tf = v.field(node, path, _text)
    if tf is None:
        return None
    tf = _beside(v.source, tf)
    try:
        token = v.read(tf).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        v.error(node, path, f"cannot read {tf}: {reason}")
        return None
    if not token:
        v.error(node, path, f"{tf} is empty")
        return None
    problem = token_problem(token)
    if problem is not None:
        v.error(node, path, f"{tf} {problem} ({TOKEN_HINT})")
        return None
    return tf


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _store(v: _Validator, node: yaml.Node, path: str) -> StoreSpec | None:
    m = v.mapping(node, path, ("type", "url", "key_prefix", "budget", "retry_interval", "cluster"))
    if m is None:
        return None
    kind = "redis"
    if "type" in m:
        kind = v.field(m["type"][1], f"{path}.type", _choice("local", "redis")) or ""
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "url": _redis_url,
        "key_prefix": _text,
        "budget": _budget,
        "retry_interval": _positive_duration,
        "cluster": _bool,
    }
    if not _scalars(v, m, path, checks, kw) or kind != "redis":
        return None
    return StoreSpec(**kw)


def _top(v: _Validator, m: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys but `groups`, as keyword arguments of `Config`."""
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "shutdown_timeout": _duration,
        "state_file": _text,
        "state_interval": _positive_duration,
        "workers": _int_in(1, MAX_WORKERS, "a number of worker processes"),
        "resolve_interval": _positive_duration,
    }
    _scalars(v, m, "", checks, kw)
    if "affinity_store" in m:
        kw["affinity_store"] = _store(v, m["affinity_store"][1], "affinity_store")
    if "state_file" in kw:
        kw["state_file"] = _beside(v.source, kw["state_file"])
    if "admin" in m:
        kw["admin"] = _admin(v, m["admin"][1], "admin")
    if "access_log" in m:
        top_log = _access_log(v, m["access_log"][1], "access_log")
        kw["access_log"] = None if top_log is _LOG_OFF else top_log
    if "kernel_marks" in m:
        km = v.mapping(m["kernel_marks"][1], "kernel_marks", ("listen",))
        if km is not None and "listen" in km:
            hp = v.field(km["listen"][1], "kernel_marks.listen", _host_port)
            if hp is not None:
                kw["kernel_marks"] = KernelMarksSpec(*hp)
        elif km is not None:
            v.error(m["kernel_marks"][1], "kernel_marks", "missing required key 'listen'")
    return kw


def _clashes(
    v: _Validator, group: GroupSpec, vnode: yaml.Node, groups: list[GroupSpec], marked: bool
) -> None:
    """A group's kernel mark and listeners against the groups before it (`marked`: the
    top-level kernel_marks listener is there)."""
    gname = group.name
    if group.kernel_mark is not None:
        if not marked:
            v.error(
                vnode, f"groups.{gname}.kernel_mark", "needs the top-level kernel_marks listener"
            )
        clash = next((g.name for g in groups if g.kernel_mark == group.kernel_mark), None)
        if clash is not None:
            v.error(
                vnode,
                f"groups.{gname}.kernel_mark",
                f"mark {group.kernel_mark} is also group {clash!r}'s",
            )
    for other in groups:
        for addr, common in _listen_overlaps(group, other):
            v.error(
                vnode,
                f"groups.{gname}.ports",
                f"{addr} port {common} is also bound by group {other.name!r}",
            )


def _groups(v: _Validator, gm: dict[str, Any], marked: bool) -> list[GroupSpec]:
    """Every group, each checked against the ones before it."""
    groups: list[GroupSpec] = []
    marks: dict[int, str] = {}
    for index, (gname, (knode, vnode)) in enumerate(gm.items()):
        if not _NAME_RE.match(gname):
            v.error(knode, f"groups.{gname}", "a group name is letters, digits, '_', '.', '-'")
            continue
        group = _group(v, gname, vnode, index)
        if group is None:
            continue
        if group.mark in marks:
            v.error(
                vnode,
                f"groups.{gname}.mark",
                f"mark {group.mark} is also used by group {marks[group.mark]!r}",
            )
            continue
        _clashes(v, group, vnode, groups, marked)
        marks[group.mark] = gname
        groups.append(group)
    return groups


def _document(v: _Validator, root: yaml.Node) -> Config | None:
    m = v.mapping(root, "", _TOP_KEYS)
    if m is None:
        return None
    kw = _top(v, m)
    if "groups" not in m:
        v.error(root, "", "missing required key 'groups'")
        return None
    gnode = m["groups"][1]
    gm = v.mapping(gnode, "groups", ())
    if gm is None:
        return None
    if not gm:
        v.error(gnode, "groups", "must define at least one group")
    groups = _groups(v, gm, "kernel_marks" in m)
    default_log = kw.get("access_log")
    for i, g in enumerate(groups):  # a group's own log, `off`, or the top level's
        own = g.access_log
        if own is None or own is _LOG_OFF:
            groups[i] = replace(g, access_log=None if own is _LOG_OFF else default_log)
    if "ha" in m:
        kw["ha"] = _ha(v, m["ha"][1], kw, groups)
    if not v.errors:
        _check_loops(v, groups, kw.get("kernel_marks"))
    if v.errors:
        return None
    return Config(
        groups=tuple(groups), source=v.source, warnings=tuple(v.warnings), files=v.files, **kw
    )
