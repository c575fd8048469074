"""Pins that survive a restart: the affinity tables written to a file and read back (`Pins`,
from the runtime's start, its shutdown and every `state_interval`).

The file (version 2) is JSON lines: a header (when it was saved, and each group's netmask and
backend names), then chunks of a few thousand entries, each a line of columns (keys, backend
indexes, seconds left) for one group, provisional entries (made by unvalidated UDP flows) in
chunks of their own. It is written atomically (a temporary file in the same folder, fsync,
rename), so a crash mid-write leaves the previous file whole. Version 1 (one JSON document) is
still read.

Saving never stalls the relay: the table is walked a slice at a time (`AffinityTable.ordered`,
oldest first, so that the restored order is the expiry order) and the file is written in a
thread. Restoring a million pins takes a few seconds of work, and the listeners must not wait
for it, so it has two steps:

1. `index`, before the listeners accept: the lines are parsed (C-speed JSON, about 0.2 s for a
   million pins) and each group's keys are indexed (key -> where its pin is). Connections that
   arrive meanwhile wait in the kernel's backlog.
2. `Restoring.run`, while the listeners serve: the pins are checked and loaded a chunk at a time,
   yielding to the loop between chunks. A client that connects before its pin is loaded is not
   scheduled afresh: its table's `fault_in` looks its key up in the index and loads that pin
   first.

Each entry carries its time left; at load, the time since the save is taken off, entries whose
group, netmask or backend no longer exist are dropped, and a corrupt file is reported and
ignored, never fatal.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.backends import Backend
from ..core.keys import V6_TAG
from ..core.reuseport import steer
from ..core.routing import Router
from ..core.spec import Config
from ..dataplane.listeners import MARKS, ListenSpec, steering_masks

log = logging.getLogger("l4lb.server")
VERSION = 2
CHUNK = 2048  # entries in a line of the file: one slice of the save and of the restore
MAX_FILE = 256 << 20  # bytes: about 8 million pins; a larger file is not one of ours
MAX_NAME = 256  # characters of a backend's name (a name and an address, for a DNS name's)
V4_END = 1 << 32


class StateFileError(Exception):
    """The file cannot be used; the message says why, in one line."""


# ---------------------------------------------------------------------- saving


async def snapshot(routers: Mapping[str, Router]) -> tuple[dict[str, Any], list[str]]:
    """The header and the chunk lines of every table, walked a slice at a time."""
    groups: dict[str, Any] = {}
    lines: list[str] = []
    for name, router in list(routers.items()):
        table = router.table
        if table is None:
            continue
        p = router.spec.persistence
        names: dict[str, int] = {}
        for keys, first, prov in table.ordered():
            for i in range(0, len(keys), CHUNK):
                rows = table.export_places(
                    keys[i : i + CHUNK], first if first < 0 else first + i, prov
                )
                for provisional in (False, True):
                    part = [r for r in rows if r[3] is provisional]
                    if part:
                        lines.append(_line(name, provisional, part, names))
                await asyncio.sleep(0)
        groups[name] = {
            "netmask": p.netmask,
            "ipv6_prefix": p.ipv6_prefix,
            "backends": list(names),
        }
    return {"version": VERSION, "saved_at": time.time(), "groups": groups}, lines


def _line(
    group: str,
    provisional: bool,
    rows: list[tuple[int, Backend, float, bool]],
    names: dict[str, int],
) -> str:
    backends = []
    for _key, b, _left, _prov in rows:
        i = names.get(b.name)
        if i is None:
            i = names[b.name] = len(names)
        backends.append(i)
    return json.dumps(
        {
            "group": group,
            "provisional": provisional,
            "keys": [r[0] for r in rows],
            "backends": backends,
            "left": [round(r[2], 3) for r in rows],
        },
        separators=(",", ":"),
    )


def write(path: str, header: dict[str, Any], lines: list[str]) -> None:
    """Blocking: run it in a thread."""
    folder = Path(path).resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=".l4lb-state-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, separators=(",", ":")) + "\n")
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- reading


@dataclass
class Chunk:
    """Entries of one group, as columns: a line of a version 2 file, or a slice of a version 1
    group (`names` None: `backends` holds names rather than indexes)."""

    group: str
    provisional: bool
    keys: list[Any]
    backends: list[Any]
    left: list[Any]
    names: list[Any] | None


@dataclass
class StateFile:
    source: str
    saved_at: float
    groups: dict[str, Any]  # name -> its header: netmask, ipv6_prefix (, backends)
    chunks: list[Chunk] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, why: str, n: int = 1) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + n


def _json(text: bytes | str, path: str) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise StateFileError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StateFileError(
            f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting 100,000 deep
        raise StateFileError(f"{path} is not a state file: {type(exc).__name__}") from None


def read(path: str) -> StateFile | None:
    """The saved pins, parsed; None when there is no file yet. Anything that is not a state
    file (not JSON, nested too deep, numbers too long, the wrong shape, too large) is a
    StateFileError, never another exception; a bad line of a version 2 file is dropped."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise StateFileError(f"{path} is over {MAX_FILE >> 20} MiB: not a state file of l4lb's")
    first, _, rest = raw.partition(b"\n")
    head = _json(first if rest.strip() else raw, path)
    if not isinstance(head, dict) or head.get("version") not in (1, VERSION):
        raise StateFileError(f"{path} is not an l4lb state file of version 1 or {VERSION}")
    if not isinstance(head.get("groups"), dict):
        raise StateFileError(f"{path} is not an l4lb state file: it has no groups")
    saved = head.get("saved_at")
    if not isinstance(saved, int | float) or isinstance(saved, bool) or not math.isfinite(saved):
        raise StateFileError(f"{path}: saved_at is not a time ({str(saved)[:40]!r})")
    groups = {k: v for k, v in head["groups"].items() if isinstance(v, dict)}
    state = StateFile(path, float(saved), groups)
    if len(groups) < len(head["groups"]):
        state.drop("a group that is not a table", len(head["groups"]) - len(groups))
    if head["version"] == 1:
        _chunks_v1(state)
    else:
        for line in rest.split(b"\n"):
            if line.strip():
                _chunk_v2(state, line)
    return state


def _chunks_v1(state: StateFile) -> None:
    for name, group in list(state.groups.items()):
        entries = group.get("entries")
        if not isinstance(entries, list):
            state.drop("a group with no list of entries")
            del state.groups[name]
            continue
        rows = [e for e in entries if isinstance(e, list) and len(e) == 3]
        if len(rows) < len(entries):
            state.drop("not [key, backend, seconds left]", len(entries) - len(rows))
        for i in range(0, len(rows), CHUNK):
            part = rows[i : i + CHUNK]
            keys = [r[0] for r in part]
            names = [r[1] for r in part]
            state.chunks.append(Chunk(name, False, keys, names, [r[2] for r in part], None))


def _chunk_v2(state: StateFile, line: bytes) -> None:
    try:
        c = json.loads(line)
    except (ValueError, RecursionError):
        state.drop("a line that is not JSON")
        return
    if not isinstance(c, dict):
        state.drop("a line that is not a chunk")
        return
    group, keys, backends, left = c.get("group"), c.get("keys"), c.get("backends"), c.get("left")
    header = state.groups.get(group) if isinstance(group, str) else None
    if (
        not isinstance(group, str)
        or header is None
        or not isinstance(keys, list)
        or not isinstance(backends, list)
        or not isinstance(left, list)
        or not len(keys) == len(backends) == len(left) <= 1 << 20
        or not isinstance(header.get("backends"), list)
    ):
        state.drop("a line that is not a chunk of a group")
        return
    prov = c.get("provisional") is True
    state.chunks.append(Chunk(group, prov, keys, backends, left, header["backends"]))


def _is_key(key: object) -> bool:
    """A key as keys.py makes them: an IPv4 address as an int, or an IPv6 one tagged V6_TAG."""
    if not isinstance(key, int) or isinstance(key, bool):
        return False
    return 0 <= key < V4_END or V6_TAG <= key < 2 * V6_TAG


def _entry(c: Chunk, pos: int, by_name: Mapping[str, Backend]) -> tuple[int, Backend, float] | str:
    """A saved entry checked field by field: (key, backend, seconds left), or why it is
    dropped."""
    key, name, left = c.keys[pos], c.backends[pos], c.left[pos]
    if not _is_key(key):
        return "a key out of range"
    if c.names is not None:
        if not isinstance(name, int) or isinstance(name, bool) or not 0 <= name < len(c.names):
            return "a backend that is not a name"
        name = c.names[name]
    if not isinstance(name, str) or len(name) > MAX_NAME:
        return "a backend that is not a name"
    backend = by_name.get(name)
    if backend is None:
        return "a backend this group no longer has"
    if not isinstance(left, int | float) or isinstance(left, bool) or not math.isfinite(left):
        return "a time left that is not a number"
    return key, backend, float(left)


def said(dropped: Mapping[str, int]) -> str:
    """`dropped` as the log line says it."""
    if not dropped:
        return "dropped 0"
    total = sum(dropped.values())
    return f"dropped {total} (" + ", ".join(f"{n}: {why}" for why, n in dropped.items()) + ")"


# ---------------------------------------------------------------------- restoring

POS_BITS = 20  # an index's value: (file << 40) | (chunk << 20) | position in the chunk
FILE_SHIFT = 40


class Restoring:
    """The pins of the files `index` read, loaded into the tables while the listeners serve."""

    def __init__(
        self,
        routers: Mapping[str, Router],
        files: list[StateFile],
        keep: Callable[[str, int], bool] | None,
    ) -> None:
        self.routers = routers
        self.files = files  # newest first
        self.keep = keep
        self.loaded = [0] * len(files)
        self.index: dict[str, dict[int, int]] = {}
        self.done = asyncio.Event()  # set when it ended, whole or not
        self.complete = False  # every file was read through: the tables may be saved again
        for f_no in reversed(range(len(files))):  # the oldest first: newer files win
            f = files[f_no]
            for c_no, c in enumerate(f.chunks):
                if not self._fits(f, c):
                    continue
                code = f_no << FILE_SHIFT | c_no << POS_BITS
                try:
                    self.index.setdefault(c.group, {}).update(
                        zip(c.keys, range(code, code + len(c.keys)), strict=True)
                    )
                except TypeError:  # a key that is a list: the chunk is not ours
                    f.drop("a chunk with keys that are not numbers", len(c.keys))
                    c.keys = []
        for name, router in routers.items():
            if router.table is not None and name in self.index:
                router.table.fault_in = self._fault_in(name)

    def _fits(self, f: StateFile, c: Chunk) -> bool:
        """Whether a chunk's group is here, with the same netmask (else dropped, counted)."""
        router = self.routers.get(c.group)
        p = router.spec.persistence if router is not None else None
        header = f.groups[c.group]
        if router is None or router.table is None or p is None:
            f.drop("a group without persistence here", len(c.keys))
        elif header.get("netmask") != p.netmask or header.get("ipv6_prefix") != p.ipv6_prefix:
            f.drop("a group whose netmask changed", len(c.keys))
        else:
            return True
        c.keys = []
        return False

    def _fault_in(self, group: str) -> Callable[[int], object]:
        def fault_in(key: int) -> None:
            code = self.index.get(group, {}).get(key)
            if code is not None:
                self._load(group, code >> FILE_SHIFT, code >> POS_BITS & 0xFFFFF, [code & 0xFFFFF])

        return fault_in

    def _load(self, group: str, f_no: int, c_no: int, positions: range | list[int]) -> None:
        router = self.routers.get(group)
        table = router.table if router is not None else None
        f = self.files[f_no]
        if router is None or table is None:
            return
        c = f.chunks[c_no]
        elapsed = max(0.0, time.time() - f.saved_at)
        index = self.index.get(group, {})
        items = []
        code = f_no << FILE_SHIFT | c_no << POS_BITS
        for pos in positions:
            got = _entry(c, pos, router.by_name)
            if isinstance(got, str):
                f.drop(got)
            elif index.get(got[0]) != code | pos:
                continue  # a newer file has this client, or the same file twice
            elif self.keep is None or self.keep(group, got[0]):
                items.append((got[0], got[1], got[2] - elapsed))
        n = table.restore(items, c.provisional)
        self.loaded[f_no] += n

    async def run(self) -> None:
        """Load every chunk, one per turn of the loop; then say what came of each file."""
        try:
            for f_no, f in enumerate(self.files):
                for c_no, c in enumerate(f.chunks):
                    if c.keys:
                        self._load(c.group, f_no, c_no, range(len(c.keys)))
                        await asyncio.sleep(0)
                log.info(
                    "state file %s: restored %d pins, %s",
                    f.source,
                    self.loaded[f_no],
                    said(f.dropped),
                )
        except Exception as exc:  # a bug here must not stop the balancer: the file is no must
            log.warning("stopped restoring the state file: %r", exc)
        else:
            self.complete = True
        finally:
            for router in self.routers.values():
                if router.table is not None:
                    router.table.fault_in = None
            self.index = {}
            self.done.set()


class Pins:
    """The state file of one process: each worker keeps the pins of its own clients in a file
    of its own (`path.N`), and takes at start the pins of its clients from any of them."""

    def __init__(self, routers: Mapping[str, Router], worker: int | None) -> None:
        self.routers = routers
        self.worker = worker
        self.restoring: Restoring | None = None

    def path(self, config: Config) -> str | None:
        path = config.state_file
        return f"{path}.{self.worker}" if path and self.worker is not None else path

    def index(self, config: Config) -> Restoring | None:
        """Step 1 of a start (see above): read and index the files; None: nothing to restore."""
        path = config.state_file
        if not path:
            return None
        if self.worker is None:
            sources = [path]
        else:
            # Every worker's file and a single process's: the pins of this worker's clients
            # are in any of them when `workers` changed since they were written.
            sources = [path, *sorted(glob.glob(glob.escape(path) + ".[0-9]*"))]
        found: list[StateFile] = []
        for source in sources:
            try:
                state = read(source)
            except StateFileError as exc:
                log.warning("ignoring the state file: %s", exc)
                continue
            if state is not None:
                found.append(state)
        if not found:
            log.info("state file %s does not exist yet", self.path(config))
            return None
        found.sort(key=lambda f: -f.saved_at)  # newest first
        keep = self._mine(config) if self.worker is not None else None
        self.restoring = Restoring(self.routers, found, keep)
        return self.restoring

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
        if self.restoring is not None and not self.restoring.complete:
            log.info("not saving the state file: it was not restored whole")
            return
        header, lines = await snapshot(self.routers)
        try:
            await asyncio.to_thread(write, path, header, lines)
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", path, exc.strerror or exc)

    async def save_periodically(self, config: Callable[[], Config]) -> None:
        while True:
            await asyncio.sleep(config().state_interval)
            await self.save(config())
