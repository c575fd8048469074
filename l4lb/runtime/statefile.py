"""Pins that survive a restart: the affinity tables written to a file and read back.

The file is JSON, written atomically (a temporary file in the same folder, fsync, rename), so
a crash mid-write leaves the previous file whole. Each entry carries its time left; at load,
the time since the save is taken off, entries whose group, netmask or backend no longer exist
are dropped, and a corrupt file is reported and ignored, never fatal.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.routing import Router

VERSION = 1


class StateFileError(Exception):
    """The file cannot be used; the message says why, in one line."""


def snapshot(routers: Mapping[str, Router]) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for name, router in routers.items():
        if router.table is None:
            continue
        p = router.spec.persistence
        groups[name] = {
            "netmask": p.netmask,
            "ipv6_prefix": p.ipv6_prefix,
            "entries": [[key, b.name, round(left, 3)] for key, b, left in router.table.snapshot()],
        }
    return {"version": VERSION, "saved_at": time.time(), "groups": groups}


def write(path: str, data: dict[str, Any]) -> None:
    """Blocking; run it in a thread for large tables."""
    folder = Path(path).resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=".l4lb-state-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str) -> dict[str, Any] | None:
    """The saved data; None when there is no file yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateFileError(
            f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("groups"), dict)
    ):
        raise StateFileError(f"{path} is not an l4lb state file of version {VERSION}")
    return data


def restore(
    routers: Mapping[str, Router],
    data: dict[str, Any],
    keep: Callable[[str, int], bool] | None = None,
) -> tuple[int, int]:
    """Load saved pins into the tables; (loaded, dropped). `keep(group, key)` picks the pins
    that belong here (a worker takes the clients steered to it); the others are passed over."""
    try:
        elapsed = max(0.0, time.time() - float(data.get("saved_at", 0)))
    except (TypeError, ValueError):
        raise StateFileError("saved_at is not a number") from None
    loaded = dropped = 0
    for name, group in data["groups"].items():
        entries = group.get("entries") if isinstance(group, dict) else None
        if not isinstance(entries, list):
            raise StateFileError(f"group {name!r} has no list of entries")
        router = routers.get(name)
        p = router.spec.persistence if router is not None else None
        if (
            router is None
            or router.table is None
            or p is None
            or group.get("netmask") != p.netmask
            or group.get("ipv6_prefix") != p.ipv6_prefix
        ):
            dropped += len(entries)
            continue
        items = []
        for item in entries:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)):
                raise StateFileError(f"group {name!r}: malformed entry {item!r}")
            key, backend_name, left = item
            if keep is not None and not keep(name, key):
                continue
            backend = router.by_name.get(backend_name)
            if backend is None or not isinstance(left, int | float):
                dropped += 1
                continue
            items.append((key, backend, float(left) - elapsed))
        n = router.table.restore(items)
        loaded += n
        dropped += len(items) - n
    return loaded, dropped
