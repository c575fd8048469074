"""Pins that survive a restart: the affinity tables written to a file and read back (`Pins`,
from the runtime's start, its shutdown and every `state_interval`).

The file is JSON, written atomically (a temporary file in the same folder, fsync, rename), so
a crash mid-write leaves the previous file whole. Each entry carries its time left; at load,
the time since the save is taken off, entries whose group, netmask or backend no longer exist
are dropped, and a corrupt file is reported and ignored, never fatal.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.backends import Backend
from ..core.keys import V6_TAG
from ..core.reuseport import steer
from ..core.routing import Router
from ..core.spec import Config
from ..dataplane.listeners import MARKS, ListenSpec, steering_masks

log = logging.getLogger("l4lb.server")
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


MAX_FILE = 256 << 20  # bytes: about 6 million pins; a larger file is not one of ours
MAX_NAME = 256  # characters of a backend's name (a name and an address, for a DNS name's)
V4_END = 1 << 32


def read(path: str) -> dict[str, Any] | None:
    """The saved data; None when there is no file yet. Anything that is not a state file
    (not JSON, nested too deep, numbers too long, the wrong shape, too large) is a
    StateFileError, never another exception."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise StateFileError(f"{path} is over {MAX_FILE >> 20} MiB: not a state file of l4lb's")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StateFileError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StateFileError(
            f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting 100,000 deep
        raise StateFileError(f"{path} is not a state file: {type(exc).__name__}") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("groups"), dict)
    ):
        raise StateFileError(f"{path} is not an l4lb state file of version {VERSION}")
    saved = data.get("saved_at")
    if not isinstance(saved, int | float) or isinstance(saved, bool) or not math.isfinite(saved):
        raise StateFileError(f"{path}: saved_at is not a time ({str(saved)[:40]!r})")
    return data


def saved_at(data: Mapping[str, Any]) -> float:
    """When a file `read` accepted was written."""
    return float(data["saved_at"])


def _is_key(key: object) -> bool:
    """A key as keys.py makes them: an IPv4 address as an int, or an IPv6 one tagged V6_TAG."""
    if not isinstance(key, int) or isinstance(key, bool):
        return False
    return 0 <= key < V4_END or V6_TAG <= key < 2 * V6_TAG


def _entry(item: object, by_name: Mapping[str, Backend]) -> tuple[int, Backend, float] | str:
    """A saved entry checked field by field: (key, backend, seconds left), or why it is
    dropped."""
    if not isinstance(item, list) or len(item) != 3:
        return "not [key, backend, seconds left]"
    key, name, left = item
    if not _is_key(key):
        return "a key out of range"
    if not isinstance(name, str) or len(name) > MAX_NAME:
        return "a backend that is not a name"
    backend = by_name.get(name)
    if backend is None:
        return "a backend this group no longer has"
    if not isinstance(left, int | float) or isinstance(left, bool) or not math.isfinite(left):
        return "a time left that is not a number"
    return key, backend, float(left)


def restore(
    routers: Mapping[str, Router],
    data: dict[str, Any],
    keep: Callable[[str, int], bool] | None = None,
) -> tuple[int, dict[str, int]]:
    """Load saved pins into the tables, entry by entry; returns how many were loaded and, by
    reason, how many were dropped. `keep(group, key)` picks the pins that belong here (a
    worker takes the clients steered to it); the others are passed over, not dropped."""
    elapsed = max(0.0, time.time() - saved_at(data))
    loaded = 0
    dropped: dict[str, int] = {}

    def drop(why: str, n: int = 1) -> None:
        dropped[why] = dropped.get(why, 0) + n

    for name, group in data["groups"].items():
        entries = group.get("entries") if isinstance(group, dict) else None
        if not isinstance(entries, list):
            drop("a group with no list of entries")
            continue
        router = routers.get(name)
        p = router.spec.persistence if router is not None else None
        if router is None or router.table is None or p is None:
            drop("a group without persistence here", len(entries))
            continue
        if group.get("netmask") != p.netmask or group.get("ipv6_prefix") != p.ipv6_prefix:
            drop("a group whose netmask changed", len(entries))
            continue
        items = []
        for item in entries:
            got = _entry(item, router.by_name)
            if isinstance(got, str):
                drop(got)
            elif keep is None or keep(name, got[0]):
                items.append((got[0], got[1], got[2] - elapsed))
        n = router.table.restore(items)
        loaded += n
        if len(items) > n:
            drop("expired, or over max_entries", len(items) - n)
    return loaded, dropped


def said(dropped: Mapping[str, int]) -> str:
    """`dropped` as the log line says it."""
    if not dropped:
        return "dropped 0"
    total = sum(dropped.values())
    return f"dropped {total} (" + ", ".join(f"{n}: {why}" for why, n in dropped.items()) + ")"


class Pins:
    """The state file of one process: each worker keeps the pins of its own clients in a file
    of its own (`path.N`), and takes at start the pins of its clients from any of them."""

    def __init__(self, routers: Mapping[str, Router], worker: int | None) -> None:
        self.routers = routers
        self.worker = worker

    def path(self, config: Config) -> str | None:
        path = config.state_file
        return f"{path}.{self.worker}" if path and self.worker is not None else path

    def load(self, config: Config) -> None:
        path = config.state_file
        if not path:
            return
        if self.worker is None:
            sources = [path]
        else:
            # Every worker's file and a single process's: the pins of this worker's clients
            # are in any of them when `workers` changed since they were written.
            sources = [path, *sorted(glob.glob(glob.escape(path) + ".[0-9]*"))]
        found: list[tuple[str, dict[str, Any]]] = []
        for source in sources:
            try:
                data = read(source)
            except StateFileError as exc:
                log.warning("ignoring the state file: %s", exc)
                continue
            if data is not None:
                found.append((source, data))
        if not found:
            log.info("state file %s does not exist yet", self.path(config))
            return
        found.sort(key=lambda f: -saved_at(f[1]))  # newest first
        keep = self._mine(config) if self.worker is not None else None
        for source, data in found:
            try:
                loaded, dropped = restore(self.routers, data, keep)
            except Exception as exc:  # a bug here must not stop the start: the file is no must
                log.warning("ignoring the state file %s: %r", source, exc)
                continue
            log.info("state file %s: restored %d pins, %s", source, loaded, said(dropped))

    def _mine(self, config: Config) -> Callable[[str, int], bool]:
        """Whether a group's key is steered to this worker (reuseport.steer, as the kernel)."""
        masks: dict[str, tuple[int, int] | None] = {}
        for g in config.groups:
            listener = MARKS if g.kernel_mark is not None else g.name
            masks[g.name] = steering_masks(config, ListenSpec(listener, "", 0, False))
        n, me = config.workers, self.worker

        def keep(group: str, key: int) -> bool:
            m = masks.get(group)
            if m is None:
                return me == 0  # not steered: one worker takes them
            packed = (key ^ V6_TAG).to_bytes(16, "big") if key & V6_TAG else key.to_bytes(4, "big")
            return steer(packed, m[0], m[1], n) == me

        return keep

    async def save(self, config: Config) -> None:
        path = self.path(config)
        if not path:
            return
        data = snapshot(self.routers)
        try:
            await asyncio.to_thread(write, path, data)
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", path, exc.strerror or exc)

    async def save_periodically(self, config: Callable[[], Config]) -> None:
        while True:
            await asyncio.sleep(config().state_interval)
            await self.save(config())
