"""An HA pair: keepalived (VRRP) moves the virtual addresses between two hosts, each running
l4lb; the pins live in the shared store; l4lb moves the open connections (`TCP_REPAIR`).

Theory of operation
-------------------
Each host's l4lb listens on the virtual addresses whether it holds them or not (`IP_FREEBIND`),
and looks every `WATCH` seconds whether it holds them (`holds`): the host that does is the
active one. It tells keepalived whether it may hold them through its VRRP instance's
`track_file` (weight negative, both hosts the same priority): `0` from its start on, `1` to give
them away. At equal priorities a backup does not preempt a master, so writing `0` again after a
hand-over leaves the addresses where they went.

A planned hand-over (`Pair.handover`, on the active host; the peer's side is pairtake.py):

1. the peer is asked its state: it must answer, serve, and not hold the addresses.
2. new connections' SYNs to the listening ports are dropped (runtime/netlock.py: they are sent
   again a second later and reach whichever host then holds the address); the dials in flight
   finish, every connection stops reading and flushes what l4lb holds (`transfer.Freezer`),
   the UDP listeners stop reading.
3. the network lock drops every packet of those connections, both ways; each connection's two
   sockets go into repair mode and are read (dataplane/repair.py), and kept open, quiet.
4. `prepare`: the records and states go to the peer, which makes every socket again in repair
   mode (its own lock on), and the flows' sockets; an error there, or here, undoes 2-3 here
   (repair mode left, the lock removed, reading again): nothing was lost.
5. the track file says `1`: keepalived lowers this host's priority and the peer takes the
   addresses (about three advertisement intervals).
6. `commit`: the peer waits until it holds the addresses, removes its lock, leaves repair mode
   (a window probe each) and relays; it answers with what it took. Only then, once the
   addresses have left this host too (both hold them for a moment), does this host close its
   sockets (in repair mode: no FIN, no reset), end the moved flows, remove its lock and write
   `0` again: it is the standby now, serving nothing until the addresses come back.
   A peer that cannot take over in `ha.timeout` answers so, and 4's undoing follows here (the
   track file back to `0`: the addresses return).

A crash keeps the pins (the shared store); new connections go to the standby once keepalived
gives it the addresses. Whether this host became active so (`failovers`) or by a hand-over is
counted and said. With `ha.idle_sync`, the idle connections survive it too (runtime/pairsync.py:
the active host streams their state; the standby makes them again at the failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..core.routing import Router
from ..core.spec import Config, HaSpec
from ..dataplane.context import DataPlane
from ..dataplane.relay import ClientSide
from ..dataplane.repair import RepairError, TcpState, thaw
from ..dataplane.repair import freeze as freeze_socket
from ..dataplane.transfer import FreezeError, Freezer, export_conn, export_flow
from ..dataplane.udp import Flow, UdpListener
from . import netlock
from .listening import Listeners
from .pairlink import LinkError, PeerLink

log = logging.getLogger("l4lb.ha")
WATCH = 0.1  # seconds between looks at whether this host holds the addresses
FREEZE = 3.0  # seconds for the connections to flush what l4lb holds
RESULTS = ("moved", "kept", "lost", "taken", "refused", "restored")


class PairError(Exception):
    """A hand-over that could not be made, or a peer's call refused; nothing was lost."""


class Host(Protocol):
    """What the pair reads of the process it runs in (`runtime.server.Runtime`)."""

    plane: DataPlane
    listeners: Listeners

    @property
    def config(self) -> Config: ...

    @property
    def routers(self) -> Mapping[str, Router]: ...

    @property
    def upgrading(self) -> bool: ...


class IdleKeeper(Protocol):
    """The idle connections' copies (runtime/pairsync.py), both hosts' halves."""

    async def run(self) -> None: ...

    async def restore(self) -> None: ...

    def clear(self) -> None: ...


def holds(address: str) -> bool:
    """Whether `address` is this host's now: a socket may bind it without IP_FREEBIND only then
    (where the host lets any address be bound, `ip_nonlocal_bind`, the kernel's own list of
    local addresses is read instead). True or False, never an error."""
    six = ":" in address
    if _nonlocal_bind(six):
        return _listed(address, six)
    with socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _nonlocal_bind(six: bool) -> bool:
    try:
        with open(f"/proc/sys/net/ipv{6 if six else 4}/ip_nonlocal_bind", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False


def _listed(address: str, six: bool) -> bool:
    """`address` among the kernel's local addresses (/proc/net/if_inet6, or the /32 LOCAL
    entries of /proc/net/fib_trie)."""
    try:
        if six:
            packed = socket.inet_pton(socket.AF_INET6, address).hex()
            with open("/proc/net/if_inet6", encoding="ascii") as f:
                return any(line.split()[0] == packed for line in f if line.strip())
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            last = ""
            for line in f:
                text = line.strip()
                if text.startswith("|--"):
                    last = text[3:].strip()
                elif text == "/32 host LOCAL" and last == address:
                    return True
    except OSError:
        return False
    return False


async def until(cond: Callable[[], bool], seconds: float, poll: float = 0.01) -> bool:
    """Whether `cond` came true within `seconds` (looked at every `poll`: an address that
    comes or goes is no event the loop hears of)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        if cond():
            return True
        if loop.time() >= end:
            return False
        await asyncio.sleep(poll)


def write_track(path: str, value: int) -> None:
    """`value` into keepalived's track file, whole (a new file renamed over the old one)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".l4lb-track-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{value}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Pair:
    """This host's part of the pair."""

    def __init__(self, host: Host, spec: HaSpec, token_file: str) -> None:
        self.host = host
        self.spec = spec
        self.link = PeerLink(spec, token_file)
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.failovers = 0  # times this host took the addresses without a hand-over
        self.active = False
        self.since = time.time()
        self.last: dict[str, Any] | None = None  # the last hand-over, given or taken
        self.busy = False  # a hand-over runs (given or taken)
        self.taking: Any = None  # pairtake.Taking while the peer hands over to this host
        self.expect_addresses = False  # a hand-over to this host: its taking them is no failover
        self.track_ok = True
        self.idle: IdleKeeper | None = None  # pairsync.IdleSync, attached by the runtime
        self._tasks: list[asyncio.Task[None]] = []

    def holds(self) -> bool:
        return all(holds(a) for a in self.spec.addresses)

    async def start(self) -> None:
        await netlock.unlock()  # (a lock a process that died mid-hand-over left)
        try:
            await self.track(0)
        except PairError as exc:  # (served all the same; a hand-over will say it too)
            log.error("ha: %s: keepalived cannot be told", exc)
        self.active = self.holds()
        log.info(
            "ha: peer %s:%d; this host %s the addresses (%s)",
            self.spec.peer_host,
            self.spec.peer_port,
            "holds" if self.active else "does not hold",
            ", ".join(self.spec.addresses),
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch())]
        if self.idle is not None and self.spec.idle_sync:
            self._tasks.append(loop.create_task(self.idle.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def track(self, value: int) -> None:
        try:
            await asyncio.to_thread(write_track, self.spec.track_file, value)
            self.track_ok = True
        except OSError as exc:
            self.track_ok = False
            raise PairError(f"cannot write the track file {self.spec.track_file}: {exc}") from None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH)
            now = self.holds()
            if now == self.active:
                continue
            self.active, self.since = now, time.time()
            if not now:
                log.info("ha: the addresses left this host: it is the standby")
            elif self.expect_addresses:
                log.info("ha: this host holds the addresses now (a hand-over)")
            else:
                self.failovers += 1
                log.warning("ha: this host holds the addresses now: a failover (the peer's gone)")
                if self.idle is not None:
                    try:
                        await self.idle.restore()
                    except Exception as exc:  # (the watch must go on, whatever happened)
                        log.error("ha: the idle connections could not be made again: %r", exc)
            self.expect_addresses = False
            if self.idle is not None:
                self.idle.clear()

    def status(self) -> dict[str, Any]:
        return {
            "role": "active" if self.active else "standby",
            "active": self.active,
            "since": self.since,
            "addresses": list(self.spec.addresses),
            "peer": f"{self.spec.peer_host}:{self.spec.peer_port}",
            "connections": dict(self.counts),
            "failovers": self.failovers,
            "last_handover": self.last,
            "busy": self.busy,
            "track_file_ok": self.track_ok,
        }

    async def peer_status(self) -> dict[str, Any]:
        try:
            return await self.link.call("GET", "/api/v1/ha", within=2.0)
        except LinkError as exc:
            return {"error": str(exc)}

    # ------------------------------------------------------------------ giving

    async def handover(self) -> dict[str, Any]:
        """Move every connection, flow and the addresses to the peer (see the theory above);
        what moved. PairError (everything still served here) when it cannot."""
        if self.busy:
            raise PairError("a hand-over is running already")
        if self.host.upgrading:
            raise PairError("an upgrade is running: hand over once it is done")
        if not self.holds():
            raise PairError("this host does not hold the addresses: hand over from the active one")
        self.busy = True
        began = time.monotonic()
        try:
            try:
                peer = await self.link.call("GET", "/api/v1/ha", within=2.0)
            except LinkError as exc:
                raise PairError(str(exc)) from None
            if peer.get("active") or peer.get("busy"):
                raise PairError("the peer holds the addresses too, or is in a hand-over")
            moved, lost, flows = await Giving(self).run()
        finally:
            self.busy = False
        took = time.monotonic() - began
        self.last = {
            "at": time.time(),
            "direction": "given",
            "connections": moved,
            "lost": lost,
            "flows": flows,
            "seconds": round(took, 3),
        }
        line = f"handed over {moved:,} connections and {flows:,} flows in {took * 1000:.0f} ms"
        if lost:
            line += f"; {lost:,} could not move (not established: closing)"
        log.info("ha: %s", line)
        return {"handover": line, **self.last}


class Giving:
    """One hand-over, seen from the host that gives (steps 2-6 of the theory above)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        host = pair.host
        self.udp = host.listeners.udp_listeners()
        self.freezer = Freezer(host.plane, self.udp)
        self.id = secrets.token_hex(8)
        self.repaired: list[socket.socket] = []  # in repair mode here, until the commit
        self.copies: list[socket.socket] = []  # `sockets_of`' copies, closed at the end

    async def run(self) -> tuple[int, int, int]:
        pair, host = self.pair, self.pair.host
        ports = [
            s.port for s, _ in host.listeners.serving.values() if s.proto == "tcp"
        ]  # (new clients' SYNs wait meanwhile)
        try:
            await netlock.lock([], ports)
            conns = await self.freezer.freeze(FREEZE)
            await netlock.lock([t for cs in conns for t in _tuples(cs)], ports)
            items, moving, lost = self._freeze_sockets(conns)
            flows, ending = self._flows()
            body = {"id": self.id, "conns": items, "flows": flows}
            await pair.link.call("POST", "/api/v1/ha/prepare", body, within=30.0)
            pair.expect_addresses = False
            await pair.track(1)
            answer = await pair.link.call(
                "POST", "/api/v1/ha/commit", {"id": self.id}, within=pair.spec.timeout + 10.0
            )
        except (LinkError, FreezeError, netlock.LockError, PairError) as exc:
            pair.counts["kept"] += len(self.freezer.frozen) + len(self.freezer.spliced)
            await self._undo()
            self._close_copies()
            raise PairError(f"hand-over failed, everything still served here: {exc}") from None
        # The peer relays them now. This host keeps its quiet sockets and its lock until the
        # addresses have left it too (for a moment both hold them): a packet that still came
        # here must meet neither a socket that answers nor none (a reset).
        await until(lambda: not pair.holds(), pair.spec.timeout)
        now = host.plane.loop.time()
        for cs in moving:
            cs.conn.termination = "handed over"
            cs.router.end(cs.conn, now=now)
        self.freezer.release(moving)  # (closed in repair mode: no FIN, no reset)
        self._close_copies()
        for listener, flow in ending:
            listener.end(flow, "handed over")
        await netlock.unlock()
        self.freezer.thaw()  # (the UDP listeners read again; nothing reaches them now)
        with contextlib.suppress(PairError):
            await pair.track(0)  # (the standby now; equal priorities: the addresses stay)
        pair.counts["moved"] += len(moving)
        pair.counts["lost"] += len(lost)
        took, took_flows = answer.get("took"), answer.get("flows")
        return (
            took if isinstance(took, int) else len(moving),
            len(lost),
            took_flows if isinstance(took_flows, int) else len(ending),
        )

    def _freeze_sockets(
        self, conns: list[ClientSide]
    ) -> tuple[list[dict[str, Any]], list[ClientSide], list[ClientSide]]:
        """Each connection's record with its two sockets' states (left in repair mode)."""
        now = self.pair.host.plane.loop.time()
        items: list[dict[str, Any]] = []
        moving: list[ClientSide] = []
        lost: list[ClientSide] = []
        for cs in conns:
            socks = sockets_of(cs)
            if socks is None:
                lost.append(cs)
                continue
            self.copies.extend(socks)
            states: list[TcpState] = []
            try:
                for sock in socks:
                    states.append(freeze_socket(sock))
                    self.repaired.append(sock)
            except RepairError as exc:
                for sock in socks:
                    if sock in self.repaired:
                        thaw(sock)
                        self.repaired.remove(sock)
                log.info("ha: a connection cannot move (%s): it stays", exc)
                lost.append(cs)
                continue
            record, _ = export_conn(cs, (b"", b""), now)
            record["tcp"] = [s.to_json() for s in states]
            items.append(record)
            moving.append(cs)
        return items, moving, lost

    def _flows(self) -> tuple[list[dict[str, Any]], list[tuple[UdpListener, Flow]]]:
        now = self.pair.host.plane.loop.time()
        out: list[dict[str, Any]] = []
        ending: list[tuple[UdpListener, Flow]] = []
        for listener in self.udp:
            for flow in list(listener.flows.values()):
                sock = flow.sock
                if sock is None or flow.backend is None:
                    continue
                try:
                    local, remote = sock.getsockname(), sock.getpeername()
                except OSError:
                    continue
                record, _ = export_flow(listener, flow, now)
                record["local"] = [local[0], local[1]]
                record["remote"] = [remote[0], remote[1]]
                out.append(record)
                ending.append((listener, flow))
        return out, ending

    def _close_copies(self) -> None:
        for sock in self.copies:
            sock.close()
        self.copies = []

    async def _undo(self) -> None:
        pair = self.pair
        with contextlib.suppress(LinkError):
            await pair.link.call("POST", "/api/v1/ha/abort", {"id": self.id}, within=5.0)
        with contextlib.suppress(PairError):
            await pair.track(0)
        for sock in self.repaired:
            with contextlib.suppress(OSError):
                thaw(sock)
        await netlock.unlock()
        self.freezer.thaw()


def sockets_of(cs: ClientSide) -> tuple[socket.socket, socket.socket] | None:
    """Copies of the connection's two sockets (the loop's own are not full sockets: they cannot
    peek), client's first; the caller closes them (the connection's stay open)."""
    peer = cs.peer
    if peer is None or cs.splice is not None:
        return None
    out = []
    for half in (cs, peer):
        sock = half.transport.get_extra_info("socket")
        if sock is None:
            break
        try:
            out.append(socket.socket(fileno=os.dup(sock.fileno())))
        except OSError:
            break
    if len(out) != 2:
        for sock in out:
            sock.close()
        return None
    return out[0], out[1]


def _tuples(cs: ClientSide) -> list[netlock.Tuple]:
    out: list[netlock.Tuple] = []
    peer = cs.peer
    for half in (cs, peer) if peer is not None else ():
        sock = half.transport.get_extra_info("socket")
        try:
            remote, local = sock.getpeername(), sock.getsockname()
        except (OSError, AttributeError):
            continue
        out.append((remote[0], remote[1], local[0], local[1]))
    return out
