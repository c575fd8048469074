"""The hand-over's format: what an upgrading l4lb sends its successor, message by message, and
the checks each record passes before anything is adopted. Versioned: `FORMAT` is what this
release writes, `READS` what it reads (this release's and the previous one's, tested with a
recorded hand-over in tests/data/); an unknown format is refused before anything moves.

A hand-over is JSON messages over a SOCK_SEQPACKET pair, descriptors attached
(`runtime/channel.Channel`), in this order: `hello` (the new process: its pid, version and the
formats it reads), `begin` (the old: its format; the new answers `ready` or `refused`), then
`listeners`, `pins`, `backends`, `counters`, `conns` (format 1 only) and `flows` batches, `end`;
the new process answers `adopted`, is told `commit`, and answers `serving`. In format 2 the
connections follow, a `conns` message a wave, each answered `took` once adopted, then `done`
with the counters counted meanwhile. The records are the same in both. Anything else, or a
record that fails its check, ends the hand-over: the old process thaws and serves on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..core.connection import HALF_CLOSED, PAIRED
from ..core.routing import Router
from ..dataplane.repair import b64_within

FORMAT = 2  # the newest this release writes
WRITES = (1, 2)  # (to a new process that reads only 1, everything moves before the commit)
READS = (1, 2)
WAVES = 2  # from this format on, the connections move after the commit, in waves
# The supervisors' own format (workers/upgrade.py; a single process growing into workers speaks
# it too: runtime/grow.py). 2: the number of workers may change; the steering switches at the
# commit.
TREE = 2
TREE_READS = (1, 2)
MAX_HELD = 64 << 20  # bytes a connection may hold between its sides (two write buffers, a pipe)
MAX_KEY = 1 << 130


class HandoverError(Exception):
    """The hand-over cannot go on; the message says why, in one line."""


def _int(v: object, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise HandoverError(f"{what}: not a number from {low} to {high}")
    return v


def _num(v: object, what: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise HandoverError(f"{what}: not a number")
    return float(v)


def _str(v: object, what: str, most: int = 256) -> str:
    if not isinstance(v, str) or len(v) > most:
        raise HandoverError(f"{what}: not a text of {most} characters at most")
    return v


def _bytes(v: object, what: str, most: int = MAX_HELD) -> bytes:
    try:
        return b64_within(v, most)
    except ValueError as exc:
        raise HandoverError(f"{what}: {exc}") from None


def _addr(v: object, what: str) -> tuple[Any, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not 2 <= len(v) <= 4:
        raise HandoverError(f"{what}: not an address")
    host = _str(v[0], what, 64)
    port = _int(v[1], what, 0, 65535)
    rest = [_int(x, what, 0, 1 << 32) for x in v[2:]]
    return (host, port, *rest)


def _routed(v: object) -> list[Any] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 4:
        raise HandoverError("routed: not [affinity, reason, port, tries]")
    return [_str(v[0], "routed", 16), _str(v[1], "routed", 64), _int(v[2], "routed", 0, 65535),
            _int(v[3], "routed", 0, 1 << 16)]  # fmt: skip


def _group(routers: Mapping[str, Router], raw: dict[str, Any], key: str = "group") -> Router:
    router = routers.get(raw.get(key))  # type: ignore[arg-type]
    if router is None:
        raise HandoverError(f"a record of group {str(raw.get(key))[:64]!r}, which is not here")
    name = raw.get("backend")
    if not isinstance(name, str) or name not in router.by_name:
        raise HandoverError(f"group {router.name}: no backend {str(name)[:64]!r} here")
    return router


def check_conn(raw: object, routers: Mapping[str, Router]) -> dict[str, Any]:
    """A connection's record, checked and decoded (`transfer.export_conn` wrote it)."""
    if not isinstance(raw, dict):
        raise HandoverError("a connection record that is not an object")
    _group(routers, raw)
    eof = raw.get("eof")
    if not isinstance(eof, list) or len(eof) != 2 or not all(isinstance(x, bool) for x in eof):
        raise HandoverError("eof: not [client, backend]")
    phase = _int(raw.get("phase"), "phase", 0, 5)
    if phase not in (PAIRED, HALF_CLOSED):
        raise HandoverError(f"phase {phase}: only a paired connection is handed over")
    return {
        "group": raw["group"],
        "backend": raw["backend"],
        "port": _int(raw.get("port"), "port", 0, 65535),
        "peer": _addr(raw.get("peer"), "peer"),
        "via": _addr(raw.get("via"), "via"),
        "key": _int(raw.get("key"), "key", 0, MAX_KEY),
        "age": max(0.0, _num(raw.get("age"), "age")),
        "connect": _num(raw.get("connect"), "connect"),
        "idle": max(0.0, _num(raw.get("idle"), "idle")),
        "bytes_in": _int(raw.get("bytes_in"), "bytes_in"),
        "bytes_out": _int(raw.get("bytes_out"), "bytes_out"),
        "phase": phase,
        "termination": _str(raw.get("termination"), "termination", 32),
        "eof": eof,
        "to_backend": _bytes(raw.get("to_backend"), "to_backend"),
        "to_client": _bytes(raw.get("to_client"), "to_client"),
        "routed": _routed(raw.get("routed")),
    }


def check_flow(raw: object, routers: Mapping[str, Router]) -> dict[str, Any]:
    """A UDP flow's record, checked and decoded (`transfer.export_flow` wrote it)."""
    if not isinstance(raw, dict):
        raise HandoverError("a flow record that is not an object")
    listener = _addr(raw.get("listener"), "listener")
    client = _addr(raw.get("client"), "client")
    if listener is None or client is None:
        raise HandoverError("a flow without its listener or client")
    reply = raw.get("reply")
    if reply is not None:
        if not isinstance(reply, list) or len(reply) != 3:
            raise HandoverError("reply: not [level, type, data]")
        reply = [_int(reply[0], "reply", 0, 1 << 16), _int(reply[1], "reply", 0, 1 << 16),
                 _bytes(reply[2], "reply", 64)]  # fmt: skip
    dst, cid = raw.get("dst"), raw.get("cid")
    return {
        "listener": listener,
        "client": client,
        "dst": _bytes(dst, "dst", 64) if dst is not None else None,
        "reply": reply,
        "key": _int(raw.get("key"), "key", 0, MAX_KEY),
        "backend": _str(raw.get("backend"), "backend"),
        "age": max(0.0, _num(raw.get("age"), "age")),
        "idle": max(0.0, _num(raw.get("idle"), "idle")),
        "bytes_in": _int(raw.get("bytes_in"), "bytes_in"),
        "bytes_out": _int(raw.get("bytes_out"), "bytes_out"),
        "heard": _int(raw.get("heard"), "heard"),
        "spare": _int(raw.get("spare"), "spare", -1, 64),
        "cid": _bytes(cid, "cid", 20) if cid is not None else None,
        "routed": _routed(raw.get("routed")),
    }
