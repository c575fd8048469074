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
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
        found.sort(key=lambda f: -float(f[1].get("saved_at", 0) or 0))  # newest first
        keep = self._mine(config) if self.worker is not None else None
        for source, data in found:
            try:
                loaded, dropped = restore(self.routers, data, keep)
            except StateFileError as exc:
                log.warning("ignoring the state file: %s", exc)
                continue
            log.info("state file %s: restored %d pins, dropped %d", source, loaded, dropped)

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
