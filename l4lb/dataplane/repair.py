"""A live TCP socket read into its state and made again from it elsewhere (`TCP_REPAIR`): how an
HA pair moves an open connection from one host to the other (runtime/pair.py).

Theory of operation
-------------------
Linux lets a process with CAP_NET_ADMIN put a socket in repair mode (`TCP_REPAIR` 1): the
socket goes quiet (nothing it is sent or asked is answered on the wire; closed, it sends no FIN
and no reset), and its inner state can be read and written: each queue's next sequence number
(`TCP_QUEUE_SEQ`, the queue chosen with `TCP_REPAIR_QUEUE`), the bytes of each queue (received
and not read; written and not acknowledged), the windows (`TCP_REPAIR_WINDOW`), the options the
handshake agreed (`TCP_INFO`'s, `TCP_MAXSEG`) and the timestamp clock (`TCP_TIMESTAMP`).

`freeze` reads all of it from a socket left in repair mode (the caller closes it once the copy
runs, or `thaw`s it if the move fails: it sends a window probe and runs on as before).
`restore` makes a new socket in repair mode, gives it the queues' sequence numbers, binds it to
the same local address (`IP_TRANSPARENT`: the address may not be this host's yet) and connects it
to the same peer (no SYN: in repair mode connect only hashes the socket as established), then
sets the options, the timestamp clock, refills both queues and sets the windows, as CRIU's
libsoccr does. It stays in repair mode until `thaw` (when this host holds the address), which
sends a window probe: the peer answers, and what it sent meanwhile is retransmitted by its own
timers. The send queue is refilled as if sent (the kernel retransmits what the peer does not
acknowledge), so data that had not left yet goes out on the first retransmission.

Only an established connection can be moved so (a half-closed one needs a forged FIN, which
CRIU sends with a raw socket: not done here, such a connection is not moved).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass, replace
from typing import Any

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
RECV_QUEUE, SEND_QUEUE, NO_QUEUE = 1, 2, 0
REPAIR_OFF_NO_PROBE = 0xFFFFFFFF  # TCP_REPAIR -1: repair mode left without a window probe
OPT_MSS, OPT_WINDOW, OPT_SACK, OPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
MAX_QUEUE = 16 << 20  # bytes a queue may hold in a state from the peer (far above any buffer)
_WINDOW = struct.Struct("=5I")
_U32 = 1 << 32


class RepairError(Exception):
    """A socket that could not be read or made again; the message says which step failed."""


@dataclass(frozen=True, slots=True)
class TcpState:
    """What `TCP_REPAIR` needs to make one end of a connection again."""

    local: tuple[str, int]
    remote: tuple[str, int]
    send_seq: int  # the send queue's next sequence number (its bytes end there)
    recv_seq: int  # the receive queue's
    send_queue: bytes  # written by l4lb, not acknowledged by the peer
    recv_queue: bytes  # received, not read by l4lb
    mss: int
    snd_wscale: int  # -1: no window scaling agreed
    rcv_wscale: int
    sack: bool
    timestamp: int  # -1: no timestamps agreed; else the socket's clock at the freeze
    window: tuple[int, int, int, int, int]  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup

    def to_json(self) -> dict[str, Any]:
        return {
            "local": list(self.local),
            "remote": list(self.remote),
            "send_seq": self.send_seq,
            "recv_seq": self.recv_seq,
            "send_queue": base64.b64encode(self.send_queue).decode(),
            "recv_queue": base64.b64encode(self.recv_queue).decode(),
            "mss": self.mss,
            "wscale": [self.snd_wscale, self.rcv_wscale],
            "sack": self.sack,
            "timestamp": self.timestamp,
            "window": list(self.window),
        }

    @classmethod
    def from_json(cls, raw: object) -> TcpState:
        """A state from the peer, checked: every field present, of its type, in its range."""
        if not isinstance(raw, dict):
            raise RepairError("a socket's state that is not an object")
        ws = raw.get("wscale")
        window = raw.get("window")
        if not isinstance(ws, list) or len(ws) != 2:
            raise RepairError("wscale: not [send, receive]")
        if not isinstance(window, list) or len(window) != 5:
            raise RepairError("window: not five numbers")
        sack = raw.get("sack")
        if not isinstance(sack, bool):
            raise RepairError("sack: not true or false")
        w = tuple(_u32(x, "window") for x in window)
        return cls(
            local=check_address(raw.get("local"), "local"),
            remote=check_address(raw.get("remote"), "remote"),
            send_seq=_u32(raw.get("send_seq"), "send_seq"),
            recv_seq=_u32(raw.get("recv_seq"), "recv_seq"),
            send_queue=_queue(raw.get("send_queue"), "send_queue"),
            recv_queue=_queue(raw.get("recv_queue"), "recv_queue"),
            mss=_int(raw.get("mss"), "mss", 1, 65535),
            snd_wscale=_int(ws[0], "wscale", -1, 14),
            rcv_wscale=_int(ws[1], "wscale", -1, 14),
            sack=sack,
            timestamp=_int(raw.get("timestamp"), "timestamp", -1, _U32 - 1),
            window=(w[0], w[1], w[2], w[3], w[4]),
        )


def _int(x: object, name: str, lo: int, hi: int) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise RepairError(f"{name}: not a whole number from {lo} to {hi}")
    return x


def _u32(x: object, name: str) -> int:
    return _int(x, name, 0, _U32 - 1)


def check_address(x: object, name: str) -> tuple[str, int]:
    if not isinstance(x, list) or len(x) != 2 or not isinstance(x[0], str):
        raise RepairError(f"{name}: not [address, port]")
    try:
        host = str(ipaddress.ip_address(x[0]))
    except ValueError:
        raise RepairError(f"{name}: {x[0][:64]!r} is not an IP address") from None
    return host, _int(x[1], name, 1, 65535)


def b64_within(x: object, most: int) -> bytes:
    """`x`, base64 of at most `most` bytes, decoded; ValueError saying why not (a record from
    another process: an upgrade's, a peer's)."""
    if not isinstance(x, str) or len(x) > most * 4 // 3 + 4:
        raise ValueError(f"not base64 of {most} bytes at most")
    try:
        return base64.b64decode(x, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


def _queue(x: object, name: str) -> bytes:
    try:
        return b64_within(x, MAX_QUEUE)
    except ValueError as exc:
        raise RepairError(f"{name}: {exc}") from None


def _opt(sock: socket.socket, option: int, value: int | bytes) -> None:
    if isinstance(value, int):  # (an unsigned 32-bit value: a sequence number may pass 2**31)
        value = struct.pack("=I", value)
    sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _seq(sock: socket.socket, queue: int) -> int:
    _opt(sock, TCP_REPAIR_QUEUE, queue)
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF


def _peek(sock: socket.socket, queue: int, ioctl: int) -> bytes:
    _opt(sock, TCP_REPAIR_QUEUE, queue)
    size = struct.unpack("i", fcntl.ioctl(sock.fileno(), ioctl, b"\0\0\0\0"))[0]
    if size <= 0:
        return b""
    data = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != size:
        raise RepairError(f"queue {queue}: {len(data)} of {size} bytes read")
    return data


def freeze(sock: socket.socket) -> TcpState:
    """`sock` in repair mode (it stays so) and its state. RepairError when it is not an
    established connection or the kernel refuses (no CAP_NET_ADMIN)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    if info[0] != TCP_ESTABLISHED:
        raise RepairError(f"not established (TCP state {info[0]})")
    try:
        _opt(sock, TCP_REPAIR, 1)
    except OSError as exc:
        raise RepairError(f"TCP_REPAIR: {exc.strerror}") from None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        options, scales = info[5], info[6]
        window = _WINDOW.unpack(
            sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)
        )
        timestamp = -1
        if options & TCPI_OPT_TIMESTAMPS:
            timestamp = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        scaled = bool(options & TCPI_OPT_WSCALE)
        state = TcpState(
            local=_name(sock.getsockname()),
            remote=_name(sock.getpeername()),
            send_seq=_seq(sock, SEND_QUEUE),
            recv_seq=_seq(sock, RECV_QUEUE),
            send_queue=_peek(sock, SEND_QUEUE, SIOCOUTQ),
            recv_queue=_peek(sock, RECV_QUEUE, SIOCINQ),
            mss=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
            snd_wscale=scales & 0xF if scaled else -1,
            rcv_wscale=scales >> 4 if scaled else -1,
            sack=bool(options & TCPI_OPT_SACK),
            timestamp=timestamp,
            window=window,
        )
        _opt(sock, TCP_REPAIR_QUEUE, NO_QUEUE)
    except OSError as exc:
        thaw(sock)
        raise RepairError(f"reading the socket's state: {exc.strerror or exc}") from None
    return state


def _name(addr: Any) -> tuple[str, int]:
    return str(addr[0]), int(addr[1])


def restore(state: TcpState) -> socket.socket:
    """A new socket made from `state`, in repair mode (`thaw` it once this host holds its
    local address). RepairError with the step that failed."""
    family = socket.AF_INET6 if ":" in state.local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    step = "TCP_REPAIR"
    try:
        _opt(sock, TCP_REPAIR, 1)
        step = "bind"
        any_source(sock, family)
        sock.bind(state.local)
        step = "the queues' sequence numbers"
        _opt(sock, TCP_REPAIR_QUEUE, RECV_QUEUE)
        _opt(sock, TCP_QUEUE_SEQ, (state.recv_seq - len(state.recv_queue)) % _U32)
        _opt(sock, TCP_REPAIR_QUEUE, SEND_QUEUE)
        _opt(sock, TCP_QUEUE_SEQ, (state.send_seq - len(state.send_queue)) % _U32)
        step = "connect"
        sock.connect(state.remote)
        step = "the options"
        _opt(sock, TCP_REPAIR_OPTIONS, _options(state))
        if state.timestamp >= 0:
            step = "the timestamp"
            _opt(sock, TCP_TIMESTAMP, state.timestamp)
        step = "the queues"
        _fill(sock, RECV_QUEUE, state.recv_queue)
        _fill(sock, SEND_QUEUE, state.send_queue)
        _opt(sock, TCP_REPAIR_QUEUE, NO_QUEUE)
        step = "the window"
        _opt(sock, TCP_REPAIR_WINDOW, _WINDOW.pack(*state.window))
    except OSError as exc:
        sock.close()  # (in repair mode: nothing is sent)
        raise RepairError(f"{step}: {exc.strerror or exc}") from None
    return sock


def any_source(sock: socket.socket, family: int) -> None:
    """Let `sock` bind and route from an address this host does not hold yet: IP_TRANSPARENT
    (IP_FREEBIND lets it bind, but a connect from such an address finds no route)."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def _options(state: TcpState) -> bytes:
    opts = [(OPT_MSS, state.mss)]
    if state.snd_wscale >= 0:
        opts.append((OPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16))
    if state.sack:
        opts.append((OPT_SACK, 0))
    if state.timestamp >= 0:
        opts.append((OPT_TIMESTAMP, 0))
    return b"".join(struct.pack("=II", code, value) for code, value in opts)


def _fill(sock: socket.socket, queue: int, data: bytes) -> None:
    if not data:
        return
    _opt(sock, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    chunk = len(data)
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError:
            if chunk <= 1024:
                raise
            chunk //= 2  # (a linear buffer of this size could not be had: smaller pieces)
            continue
        view = view[sent:]


def snapshot(sock: socket.socket) -> TcpState:
    """`sock`'s state now, the socket running on (repair mode for the read alone, left
    without a window probe): for an idle connection, what a crash of this host would need."""
    state = freeze(sock)
    _opt(sock, TCP_REPAIR, REPAIR_OFF_NO_PROBE)
    return state


def aged(state: TcpState, seconds: float) -> TcpState:
    """`state` with its timestamp clock moved on by `seconds` (the kernel's ticks are ms)."""
    if state.timestamp < 0:
        return state
    return replace(state, timestamp=(state.timestamp + int(seconds * 1000)) % _U32)


def thaw(sock: socket.socket) -> None:
    """Leave repair mode: the kernel sends a window probe and the connection runs on."""
    _opt(sock, TCP_REPAIR, 0)


def may_repair() -> bool:
    """Whether this process may use TCP_REPAIR (it has CAP_NET_ADMIN)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 12 & 1)
    except (OSError, ValueError):
        return False
    return False
