"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the header that carries a client's
address across a proxy. Pure: bytes in, bytes or a parsed header out.

`parse` is written for hostile input: it never reads past what it was given, says "need more"
for a prefix of a valid header, and rejects anything else, including headers longer than
`MAX_HEADER`. TLVs of version 2 are walked, each length checked against what the header
announced (a refusal when one does not fit), and their content ignored.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest v1 line, CRLF included
MAX_HEADER = 16 + 1024  # v2: 16-byte preamble and at most this much address and TLV data
_V2_FAMILIES = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}


class ProxyError(ValueError):
    """The bytes are not a PROXY header this balancer will accept."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` is None for LOCAL (v2) or UNKNOWN (v1): use the peer's."""

    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    length: int  # bytes the header took; what follows is the client's data


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("a v1 header longer than 107 bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyError("a v1 header with a bare CR or LF")
        return None
    parts = data[:end].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyError("not a PROXY header")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(source=None, dest=None, length=end + 2)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("a v1 header needs TCP4|TCP6 and four fields")
    family = socket.AF_INET if parts[1] == b"TCP4" else socket.AF_INET6
    try:
        src = socket.inet_ntop(family, socket.inet_pton(family, parts[2].decode("ascii")))
        dst = socket.inet_ntop(family, socket.inet_pton(family, parts[3].decode("ascii")))
        sport, dport = int(parts[4]), int(parts[5])
    except (OSError, UnicodeDecodeError, ValueError):
        raise ProxyError("a v1 header with a malformed address or port") from None
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535) or not (
        parts[4].isdigit() and parts[5].isdigit()
    ):
        raise ProxyError("a v1 header with a port out of range")
    return ProxyHeader((src, sport), (dst, dport), end + 2)


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError("a v2 header with another version")
    if 16 + length > MAX_HEADER:
        raise ProxyError(f"a v2 header of {16 + length} bytes (at most {MAX_HEADER})")
    if len(data) < 16 + length:
        return None
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection (a health check, say)
        return ProxyHeader(source=None, dest=None, length=16 + length)
    if command != 0x1:
        raise ProxyError("a v2 header with an unknown command")
    if fam == 0x00:  # UNSPEC
        return ProxyHeader(source=None, dest=None, length=16 + length)
    if fam not in _V2_FAMILIES:
        raise ProxyError("a v2 header for a family other than TCP over IPv4 or IPv6")
    family, size = _V2_FAMILIES[fam]
    if length < 2 * size + 4:
        raise ProxyError("a v2 header too short for its addresses")
    body = data[16 : 16 + 2 * size + 4]
    src = socket.inet_ntop(family, body[:size])
    dst = socket.inet_ntop(family, body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size :])
    _check_tlvs(data, 16 + 2 * size + 4, 16 + length)
    return ProxyHeader((src, sport), (dst, dport), 16 + length)


def _check_tlvs(data: bytes, start: int, end: int) -> None:
    """Walk the TLVs between `start` and `end` (type, a 2-byte length, the value): each must
    fit in what the header announced. Their content is not used."""
    at = start
    while at < end:
        if at + 3 > end:
            raise ProxyError("a v2 header with a truncated TLV")
        at += 3 + struct.unpack("!H", data[at + 1 : at + 3])[0]
        if at > end:
            raise ProxyError("a v2 TLV longer than its header")


def parse(data: bytes) -> ProxyHeader | None:
    """A header at the start of `data`; None when `data` is a prefix of one (read more)."""
    if data[:1] == b"P":
        if not b"PROXY "[: len(data)] == data[:6]:
            raise ProxyError("not a PROXY header")
        return _v1(data)
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyError("not a PROXY header")
        return _v2(data)
    if not data:
        return None
    raise ProxyError("not a PROXY header")


def _family_of(host: str) -> tuple[int, str]:
    if host.startswith("::ffff:") and "." in host:
        return socket.AF_INET, host[7:]
    return (socket.AF_INET6, host) if ":" in host else (socket.AF_INET, host)


def encode(version: str, source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A v1 or v2 header for a TCP connection from `source` to `dest`."""
    sfam, shost = _family_of(source[0])
    dfam, dhost = _family_of(dest[0])
    if sfam != dfam:  # an IPv4 client on an IPv6 address: say it in IPv6
        sfam = dfam = socket.AF_INET6
        shost = shost if ":" in shost else f"::ffff:{shost}"
        dhost = dhost if ":" in dhost else f"::ffff:{dhost}"
    if version == "v1":
        proto = "TCP4" if sfam == socket.AF_INET else "TCP6"
        return f"PROXY {proto} {shost} {dhost} {source[1]} {dest[1]}\r\n".encode()
    fam = 0x11 if sfam == socket.AF_INET else 0x21
    body = (
        socket.inet_pton(sfam, shost)
        + socket.inet_pton(dfam, dhost)
        + struct.pack("!HH", source[1], dest[1])
    )
    return V2_SIGNATURE + bytes((0x21, fam)) + struct.pack("!H", len(body)) + body
