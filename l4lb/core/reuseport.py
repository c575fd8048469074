"""Steering a client to one worker: a classic BPF program on each SO_REUSEPORT socket group.

Theory of operation
-------------------
With `workers: N`, every listening address is N sockets in one SO_REUSEPORT group, opened by
the supervisor in worker order (socket i belongs to worker i). Left alone, the kernel picks a
socket by a hash of the 4-tuple, so one client's connections (other source ports, other service
ports) land on different workers, each with its own affinity table. Instead, the program below
runs on each SYN and returns the worker index from the client's address *masked by the group's
netmask* alone:

    index = ((masked source address, folded to 32 bits) * 0x9E3779B1 mod 2^32 >> 16) mod N

The multiplication spreads the masked address's high bits (a /24 has zero low bits, which a
plain `mod N` would send to worker 0); the shift keeps the well-mixed middle bits. IPv6 sources
fold their four words (each masked by the prefix) with multiply-and-xor. The program reads the
IP header at SKF_NET_OFF, so one program serves IPv4 sockets, IPv6 sockets and IPv4 clients of
a dual-stack socket alike. Since the index depends only on the masked address, every port of a
group, and every group on the same mask, sends one client to one worker.

socket(7): "Sockets are numbered in the order in which they are added to the group (the order of
listen(2) calls for TCP sockets)", and closing one moves the last socket into its place. The
supervisor therefore listens on all N sockets itself and keeps them open, so a crashed worker's
sockets stay in their places: its respawn takes them over, and nobody else's clients move.

`steer` computes the same index in Python, for tests and for routing state across workers.

When an upgrade changes N to M, the group grows (sockets appended at N..M-1) or keeps its
N sockets until the old ones retire; the program switches to M at the commit. A client queued
on socket i before the switch is accepted by the new worker `serving(i, M)`: i itself, or,
for a retiring socket (i >= M), worker i mod M, which serves it for a grace period.
"""

from __future__ import annotations

import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
SKF_NET_OFF = -0x100000
GOLDEN = 0x9E3779B1

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_AND_K, _MUL_K, _RSH_K, _MOD_K, _XOR_X = 0x54, 0x24, 0x74, 0x94, 0xAC
_JEQ_K, _JA = 0x15, 0x05
_TAX, _RET_A = 0x07, 0x16


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _prefix_words(bits: int, words: int) -> list[int]:
    """A prefix length as `words` 32-bit masks, most significant first."""
    out = []
    for i in range(words):
        n = max(0, min(32, bits - 32 * i))
        out.append((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF if n else 0)
    return out


def program(v4_mask: int, v6_bits: int, workers: int) -> bytes:
    """The steering program for a group keyed by `v4_mask` (IPv4, as an integer: LVS allows
    any mask) and a /v6_bits prefix (IPv6)."""
    v4 = [
        _ins(_LD_W_ABS, SKF_NET_OFF + 12),  # the IPv4 source address
        _ins(_AND_K, v4_mask),
    ]
    v6: list[bytes] = []
    for i, mask in enumerate(_prefix_words(v6_bits, 4)):
        if i:
            v6 += [_ins(_MUL_K, GOLDEN), _ins(_TAX)]
        v6 += [_ins(_LD_W_ABS, SKF_NET_OFF + 8 + 4 * i), _ins(_AND_K, mask)]
        if i:
            v6.append(_ins(_XOR_X))
    head = [
        _ins(_LD_B_ABS, SKF_NET_OFF),  # version and header length
        _ins(_RSH_K, 4),
        _ins(_JEQ_K, 4, 0, len(v4) + 1),  # IPv4: fall through; else skip to the IPv6 part
    ]
    v4.append(_ins(_JA, len(v6)))  # over the IPv6 part, to the hash
    tail = [_ins(_MUL_K, GOLDEN), _ins(_RSH_K, 16), _ins(_MOD_K, workers), _ins(_RET_A)]
    return b"".join(head + v4 + v6 + tail)


def steer(packed: bytes, v4_mask: int, v6_bits: int, workers: int) -> int:
    """The worker `program` sends a client to; `packed` is its 4- or 16-byte address."""
    m = 0xFFFFFFFF
    if len(packed) == 4:
        a = int.from_bytes(packed, "big") & v4_mask
    else:
        masks = _prefix_words(v6_bits, 4)
        a = 0
        for i in range(4):
            word = int.from_bytes(packed[4 * i : 4 * i + 4], "big") & masks[i]
            a = word if i == 0 else ((a * GOLDEN) & m) ^ word
    return (((a * GOLDEN) & m) >> 16) % workers


def serving(socket_index: int, workers: int) -> int:
    """The new worker that serves socket `socket_index` of a group resized to `workers`."""
    return socket_index if socket_index < workers else socket_index % workers


def attach(sock: socket.socket, code: bytes) -> None:
    """Install `code` on the reuseport group of `sock` (one socket of the group suffices)."""
    import ctypes  # here: only the supervisor of `workers: N` attaches a program

    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Remove the group's program: the kernel's own hash picks again."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
