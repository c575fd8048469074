"""QUIC-LB routing for one group (beside `quiclb.py`, the codec): which backend a datagram's
destination connection ID names, and how a datagram that opens a flow is routed, after the
draft's section 3.1 (`QuicRouting.route`), and the flow sent there (`QuicRouting.steer`). Pure."""

from __future__ import annotations

from .affinity import AffinityTable
from .backends import Backend
from .quiclb import CHOSEN, OTHER, SHORT, Codec, destination_cid
from .route import Route
from .spec import QuicLbSpec


class QuicRouting:
    """A group's connection ID codec and its server IDs' backends."""

    __slots__ = ("codec", "owners")

    def __init__(self, spec: QuicLbSpec, backends: list[Backend]) -> None:
        self.codec = Codec(spec.config_id, spec.server_id_length, spec.nonce_length, spec.key)
        self.owners: dict[bytes, Backend] = {}  # server ID -> its backend
        for b in backends:  # (a name resolved to many addresses: its first owns the ID)
            if b.server_id:
                self.owners.setdefault(bytes.fromhex(b.server_id), b)

    def route(
        self, datagram: bytes, key: int, table: AffinityTable[Backend] | None
    ) -> tuple[str, Backend | None, bytes]:
        """How a QUIC datagram that opens a flow (a client address and port new to l4lb) is
        routed, and the destination connection ID it was read from (b"" when none was): `cid`
        to the backend whose server ID its destination connection ID carries (returned), when
        that backend takes pinned clients and has a free slot; `full` (dropped) when that
        backend is at its `max_conns`: the connection lives on that server and no other can
        answer it, so the datagram waits for the client's retransmission rather than meet
        another server's stateless reset; `pin` by today's rule when the client chose the ID
        (a v1 Initial or 0-RTT); `fallback` by today's rule for a long header whose ID is
        unroutable (another config, the 0b111 codepoint, an unknown or unavailable server),
        and for a short header whose client network (`key`) is pinned to a backend that takes
        it; `unroutable` (dropped) for any other short header: no server asked for it (a
        random ID from a fresh network), one too short for its ID included (the draft counts
        it unroutable); and `malformed` (dropped) for a long header too short to say its
        connection ID."""
        codec = self.codec
        got = destination_cid(datagram, 1 + codec.length)
        dcid = b""
        if got is not None:
            dcid, kind = got
            if kind == CHOSEN:
                return "pin", None, dcid
            sid = codec.server_id(dcid)
            owner = self.owners.get(sid) if sid is not None else None
            if owner is not None and owner.accepts_pinned and not owner.removed:
                return ("full" if owner.full else "cid"), owner, dcid
            if kind != SHORT:
                return ("pin" if kind == OTHER else "fallback"), None, dcid
        elif not datagram or datagram[0] & 0x80:  # a long header cut short, or nothing
            return "malformed", None, dcid
        entry = table.get(key) if table is not None else None
        pinned = entry.backend if entry is not None else None
        if pinned is not None and pinned.accepts_pinned:
            return "fallback", None, dcid
        return "unroutable", None, dcid

    @staticmethod
    def takes_new(backend: Backend, backends: list[Backend]) -> bool:
        """Whether `backend` may be given a client it has never had: schedulable (up, enabled,
        weight above 0, a free slot), and for a backup, only while no primary is."""
        if not backend.schedulable or backend.removed:
            return False
        return not backend.backup or not any(b.schedulable for b in backends if not b.backup)

    def steer(self, route: Route, backend: Backend, backends: list[Backend]) -> None:
        """A QUIC connection ID names `backend`: this flow goes there whatever the pin says. The
        client network's entry is pinned there only if it had no pin (a migrated client's new
        network: its TCP follows) and the backend takes new clients (not draining, not a
        backup while a primary can take them: a forged ID must not give a network a pin the
        scheduler would never have made); a network pinned elsewhere keeps its pin. (`backends`:
        the group's.)"""
        route.steered = True
        entry = route.entry
        if entry is not None and entry.backend is None and self.takes_new(backend, backends):
            entry.backend = backend
        route.tried.append(backend)
        backend.take_slot()
        route.backend = backend
