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

import array
import asyncio
import base64
import contextlib
import errno
import glob
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.files import FileRefused, read_file
from ..core.backends import Backend
from ..core.keys import V6_TAG
from ..core.reuseport import serving, steer
from ..core.routing import Router
from ..core.spec import Config
from ..dataplane import walk
from ..dataplane.listeners import MARKS, ListenSpec, steering_masks
from .heap import give_back

log = logging.getLogger("l4lb.server")
VERSION = 2
CHUNK = 2048  # entries in a line of the file, at most
MAX_FILE = 256 << 20  # bytes: about 8 million pins; a larger file is not one of ours
MAX_V1 = 16 << 20  # bytes of a version 1 file (one JSON document, parsed whole): 230,000 pins
TEMP_PREFIX = ".l4lb-state-"  # a save's temporary file, beside the state file
_V1 = re.compile(rb'"version"\s*:\s*1\b')  # how a version 1 file says so, near its start
MAX_NAME = 256  # characters of a backend's name (a name and an address, for a DNS name's)
V4_END = 1 << 32
MAX_MS = (1 << 32) - 1  # time left in a file, at most: 49 days
KINDS = ((False, False), (False, True), (True, False), (True, True))  # (provisional, IPv6)


class StateFileError(Exception):
    """The file cannot be used; the message says why, in one line."""


# ---------------------------------------------------------------------- saving


async def snapshot(
    routers: Mapping[str, Router], since_mark: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The header and the chunk lines of every table, walked a slice at a time (`since_mark`:
    what changed since each table's `mark` only)."""
    groups: dict[str, Any] = {}
    lines: list[str] = []
    pacer = walk.Pacer()
    for name, router in list(routers.items()):
        table = router.table
        if table is None:
            continue
        p = router.spec.persistence
        names: dict[str, int] = {}
        for keys, first, prov in table.ordered_since() if since_mark else table.ordered():
            rows: list[tuple[int, Backend, float, bool]] = []
            for i in range(0, len(keys), walk.BATCH):
                part = keys[i : i + walk.BATCH]
                rows += table.export_places(part, first if first < 0 else first + i, prov)
                if len(rows) >= CHUNK or i + walk.BATCH >= len(keys):
                    for provisional, v6 in KINDS:  # (a line holds one kind)
                        some = [r for r in rows if r[3] is provisional and (r[0] >= V6_TAG) is v6]
                        if some:
                            lines.append(_line(name, provisional, some, names))
                    rows = []
                await pacer.pause()
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
    return encode_chunk(group, provisional, [r[0] for r in rows], backends, [r[2] for r in rows])


def encode_chunk(
    group: str, provisional: bool, keys: list[int], backends: list[int], left: list[float]
) -> str:
    """A line of the file: the columns packed little-endian and base64'd (a million pins
    parse in a tenth of the time JSON numbers take): IPv4 keys as 4 bytes each, IPv6 ones as
    16 (the address; `v6` says which), backend indexes 2 bytes, time left in ms, 4 bytes."""
    v6 = bool(keys) and keys[0] >= V6_TAG
    if v6:
        packed = b"".join((k ^ V6_TAG).to_bytes(16, "big") for k in keys)
    else:
        packed = _le(array.array("I", keys))
    ms = array.array("I", [min(MAX_MS, max(1, int(x * 1000))) for x in left])
    return json.dumps(
        {
            "group": group,
            "provisional": provisional,
            "v6": v6,
            "keys": base64.b64encode(packed).decode(),
            "backends": base64.b64encode(_le(array.array("H", backends))).decode(),
            "left_ms": base64.b64encode(_le(ms)).decode(),
        },
        separators=(",", ":"),
    )


def _le(a: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _array(code: str, data: bytes) -> array.array[int]:
    """Little-endian numbers, as an array: no object per number until one is read."""
    a = array.array(code)
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


def _unle(code: str, data: bytes) -> list[int]:
    return _array(code, data).tolist()


def write(path: str, header: dict[str, Any], lines: list[str]) -> None:
    """Blocking: run it in a thread."""
    folder = Path(path).resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{Path(path).name}-", dir=folder)
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


def remove_strays(path: str) -> list[str]:
    """The temporary files a save of `path` left when its process was killed mid-write (its
    own prefix: a worker's file is `path.N`, so a worker never removes another's save in
    progress), and those of releases that named them `.l4lb-state-XXXXXXXX`; removed at
    start, before this process saves. Blocking. Returns what was removed."""
    folder = Path(path).resolve().parent
    mine = glob.escape(f"{TEMP_PREFIX}{Path(path).name}-") + "*"
    legacy = glob.escape(TEMP_PREFIX) + "[!.]" * 8  # mkstemp's 8 characters, no name
    removed: list[str] = []
    for pattern in (mine, legacy):
        for stray in glob.glob(pattern, root_dir=folder, include_hidden=True):
            with contextlib.suppress(FileNotFoundError):
                (folder / stray).unlink()
                removed.append(stray)
    return removed


# ---------------------------------------------------------------------- reading


@dataclass
class Chunk:
    """Entries of one group, as columns: a line of a version 2 file, or a slice of a version 1
    group (`names` None: `backends` holds names rather than indexes)."""

    group: str
    provisional: bool
    keys: list[Any]
    backends: list[Any]
    left: Sequence[Any]  # seconds, or ms in an array (version 2): times `scale` is seconds
    names: list[Any] | None
    scale: float = 1.0


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
        raw = read_file(path, MAX_FILE)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        if exc.errno == errno.EFBIG:
            raise StateFileError(
                f"{path} is over {MAX_FILE >> 20} MiB: not a state file of l4lb's"
            ) from None
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse(raw, path)


def json_line(header: dict[str, Any]) -> bytes:
    """A state file's first line (`snapshot`'s header)."""
    return json.dumps(header, separators=(",", ":")).encode()


def parse(raw: bytes, path: str) -> StateFile:
    """A state file's bytes, parsed (`path` names them in what is said of them): from a file,
    or from the process an upgrade hands the pins over from."""
    first, _, rest = raw.partition(b"\n")
    if not rest.strip() and len(raw) > MAX_V1:
        # Version 1 is one JSON document, parsed whole into objects: about 14 times its size
        # in memory (68 MB took 0.97 GB). Refused past a bound; the next save writes version 2.
        if _V1.search(raw[:4096]) is None:
            raise StateFileError(f"{path} is one line over {MAX_V1 >> 20} MiB: not a state file")
        raise StateFileError(
            f"{path} is a state file of version 1 over {MAX_V1 >> 20} MiB: not read (it would"
            " take about 14 times that in memory); its pins are lost once, and the next save"
            " writes version 2"
        )
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
    group = c.get("group")
    header = state.groups.get(group) if isinstance(group, str) else None
    try:
        if not isinstance(group, str) or header is None:
            raise ValueError
        if not isinstance(header.get("backends"), list):
            raise ValueError
        v6 = c.get("v6") is True
        raw = base64.b64decode(c["keys"], validate=True)
        backends = _unle("H", base64.b64decode(c["backends"], validate=True))
        ms = _array("I", base64.b64decode(c["left_ms"], validate=True))
        n = len(backends)
        if len(raw) != n * (16 if v6 else 4) or len(ms) != n or n > 1 << 20:
            raise ValueError
    except (KeyError, TypeError, ValueError):  # (binascii.Error is a ValueError)
        state.drop("a line that is not a chunk of a group")
        return
    if v6:
        keys = [V6_TAG | int.from_bytes(raw[i : i + 16], "big") for i in range(0, len(raw), 16)]
    else:
        keys = _unle("I", raw)
    prov = c.get("provisional") is True
    state.chunks.append(Chunk(group, prov, keys, backends, ms, header["backends"], 0.001))


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
    return key, backend, left * c.scale


def said(dropped: Mapping[str, int]) -> str:
    """`dropped` as the log line says it."""
    if not dropped:
        return "dropped 0"
    total = sum(dropped.values())
    return f"dropped {total} (" + ", ".join(f"{n}: {why}" for why, n in dropped.items()) + ")"


# ---------------------------------------------------------------------- restoring


class Restoring:
    """The pins of the files `index` read, loaded into the tables while the listeners serve.

    The index is a set of keys per chunk not yet loaded (building sets is C-speed: a million
    keys in a few tens of ms, where a key -> place dict takes several times that): a miss during
    the restore looks for its key in each pending chunk of its group, newest file first (some
    tens of microseconds, for the few seconds the restore lasts), and loads that one pin. The
    files are loaded newest first, and a loaded key is never replaced, so a newer file wins."""

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
        # group -> (file, chunk) -> the chunk's keys, in load order, while not loaded whole
        self.pending: dict[str, dict[tuple[int, int], set[int]]] = {}
        self.done = asyncio.Event()  # set when it ended, whole or not
        self.complete = False  # every file was read through: the tables may be saved again
        for f_no, f in enumerate(files):
            for c_no, c in enumerate(f.chunks):
                if not self._fits(f, c):
                    continue
                try:
                    members = set(c.keys)
                except TypeError:  # a key that is a list: the chunk is not ours
                    f.drop("a chunk with keys that are not numbers", len(c.keys))
                    c.keys = []
                    continue
                self.pending.setdefault(c.group, {})[f_no, c_no] = members
        for name, router in routers.items():
            if router.table is not None and name in self.pending:
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
            for (f_no, c_no), members in self.pending.get(group, {}).items():
                if key in members:
                    pos = self.files[f_no].chunks[c_no].keys.index(key)
                    self._load(group, f_no, c_no, [pos])
                    return

        return fault_in

    def _load(self, group: str, f_no: int, c_no: int, positions: range | list[int]) -> None:
        router = self.routers.get(group)
        table = router.table if router is not None else None
        f = self.files[f_no]
        if router is None or table is None:
            return
        c = f.chunks[c_no]
        elapsed = max(0.0, time.time() - f.saved_at)
        items = []
        for pos in positions:
            got = _entry(c, pos, router.by_name)
            if isinstance(got, str):
                f.drop(got)
            elif self.keep is None or self.keep(group, got[0]):
                items.append((got[0], got[1], got[2] - elapsed))
        n = table.restore(items, c.provisional)  # (a key already there stays: newer wins)
        self.loaded[f_no] += n

    async def run(self) -> None:
        """Load every chunk, a batch at a time, paced; then say what came of each file."""
        pacer = walk.Pacer()
        try:
            for f_no, f in enumerate(self.files):
                for c_no, c in enumerate(f.chunks):
                    for i in range(0, len(c.keys), walk.BATCH):
                        n = min(len(c.keys), i + walk.BATCH)
                        self._load(c.group, f_no, c_no, range(i, n))
                        await pacer.pause()
                    self.pending.get(c.group, {}).pop((f_no, c_no), None)
                    c.keys, c.backends, c.left = [], [], []  # (loaded: its memory goes back)
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
            self.pending = {}
            self.files = []
            give_back()
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
        """Step 1 of a start (see above): read and index the files; None: nothing to restore.
        Blocking (a file of 256 MiB at most): the runtime runs it in a thread."""
        path = config.state_file
        if not path:
            return None
        own = self.path(config)
        assert own is not None
        try:
            strays = remove_strays(own)
        except OSError as exc:
            log.warning("cannot look for a killed save's temporary files: %s", exc)
        else:
            if strays:
                log.info(
                    "removed %d temporary file(s) of saves killed mid-write: %s",
                    len(strays),
                    ", ".join(strays),
                )
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

    def taken(
        self, states: list[StateFile], keep: Callable[[str, int], bool] | None = None
    ) -> Restoring | None:
        """The pins an upgrade's previous process handed over (state files' lines, from its
        memory: the newest first), to restore as files' are (see above); `keep`: a worker's
        share when the number of workers changed (`resharded`)."""
        if not states:
            return None
        self.restoring = Restoring(self.routers, states, keep)
        return self.restoring

    def _mine(self, config: Config) -> Callable[[str, int], bool]:
        """Whether a group's key is steered to this worker (reuseport.steer, as the kernel)."""
        to = steering(config)
        n, me = config.workers, self.worker

        def keep(group: str, key: int) -> bool:
            got = to(group, key, n)
            return me == 0 if got is None else got == me  # not steered: one worker takes them

        return keep

    def resharded(self, config: Config, before: int) -> Callable[[str, int], bool]:
        """A worker's share of the pins when an upgrade changes the number of workers from
        `before`: its clients under the new steering, and those of the old sockets it
        serves until they retire (`reuseport.serving`): a client queued there at the switch
        is accepted here, and finds its pin."""
        to = steering(config)
        n, me = config.workers, self.worker

        def keep(group: str, key: int) -> bool:
            now = to(group, key, n)
            if now is None:
                return me == 0
            was = to(group, key, before)
            return now == me or (was is not None and serving(was, n) == me)

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


def steering(config: Config) -> Callable[[str, int, int], int | None]:
    """The worker among n that the kernel steers a group's key to (`reuseport.steer`); None
    for a group without persistence (the kernel's own hash: not predictable)."""
    masks: dict[str, tuple[int, int] | None] = {}
    for g in config.groups:
        listener = MARKS if g.kernel_mark is not None else g.name
        masks[g.name] = steering_masks(config, ListenSpec(listener, "", 0, False))

    def to(group: str, key: int, n: int) -> int | None:
        m = masks.get(group)
        if m is None:
            return None
        packed = (key ^ V6_TAG).to_bytes(16, "big") if key & V6_TAG else key.to_bytes(4, "big")
        return steer(packed, m[0], m[1], n)

    return to
