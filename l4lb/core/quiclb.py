"""QUIC-LB connection IDs: the server ID a QUIC server wrote into the connection IDs it issues.

Theory of operation
-------------------
After draft-ietf-quic-load-balancers (the editor's copy of 28 February 2025, after -20; its
sections cited below). A QUIC-LB connection ID is

    First Octet (8) = Config Rotation (3) || CID Len or Random Bits (5)     (section 2.4)
    Server ID (server_id_length octets) || Nonce (nonce_length octets)       (section 4.1)

The config rotation bits name the configuration (`config_id`, 0-6); 0b111 is the unroutable
codepoint (section 2.2: route by the 4-tuple). Without a key the server ID is in plain text
(section 4.4). With a 16-octet AES-128 key the server ID and nonce are encrypted: when their
lengths sum to exactly 16, as one AES-ECB block (single pass, sections 4.3.1 and 4.4.1);
otherwise by a four-round Feistel network whose round function is AES-ECB of an `expand`ed half
(sections 4.3.2 and 4.4.2). For an odd length the two halves share the middle octet, four bits
each, and the round results are masked to keep them so. A load balancer needs three rounds when
the server ID fits in the left half (the nonce is at least as long), four otherwise.

`Codec.server_id(cid)` is the load balancer's side: the server ID of a connection ID, or None
when it is unroutable (another config, the unroutable codepoint, too short). `Codec.encode` is
the server's side, used by the tests' QUIC servers and by the test vectors (Appendix B).
Pure: no sockets, no clock; AES comes from `cryptography`, imported only when a key is given.
"""

from __future__ import annotations

from typing import Any

UNROUTABLE = 0b111  # config rotation codepoint: route by the 4-tuple (section 2.2)
MAX_CONFIG_ID = 6


class Codec:
    """One QUIC-LB configuration: its config ID, the lengths and the key (None: plaintext)."""

    def __init__(
        self, config_id: int, server_id_length: int, nonce_length: int, key: bytes | None = None
    ) -> None:
        if not 0 <= config_id <= MAX_CONFIG_ID:
            raise ValueError(f"config_id must be 0 to {MAX_CONFIG_ID}")
        if server_id_length < 1 or nonce_length < 4 or server_id_length + nonce_length > 19:
            raise ValueError(
                "server_id_length must be at least 1 and nonce_length at least 4,"
                " together at most 19 (section 4.2)"
            )
        if key is not None and len(key) != 16:
            raise ValueError("the key must be 16 octets (AES-128)")
        self.config_id = config_id
        self.sid_len = server_id_length
        self.nonce_len = nonce_length
        self.length = server_id_length + nonce_length  # the CID's length after its first octet
        self._enc: Any = None
        self._dec: Any = None
        # The four-pass network's half length, its masks (an odd length's halves share the
        # middle octet: the left keeps its high nibble, the right its low one) and the tail of
        # each pass's AES input: zeros, the length, the pass (expand, section 4.3.2.2).
        h = self._half = (self.length + 1) // 2
        full = (1 << 8 * h) - 1
        self._ml = full ^ 0x0F if self.length % 2 else full
        self._mr = full >> 4 if self.length % 2 else full
        self._tails = [bytes(14 - h) + bytes([self.length, p]) for p in range(5)]
        if key is not None:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            cipher = Cipher(algorithms.AES(key), modes.ECB())
            self._enc = cipher.encryptor()  # (ECB keeps no state between blocks: reused)
            self._dec = cipher.decryptor()

    # ------------------------------------------------------------------ the load balancer's side

    def server_id(self, cid: bytes) -> bytes | None:
        """The server ID `cid` carries, or None: not this configuration's, or too short."""
        if len(cid) < 1 + self.length or cid[0] >> 5 != self.config_id:
            return None
        body = cid[1 : 1 + self.length]
        if self._enc is None:
            return body[: self.sid_len]
        if self.length == 16:
            return bytes(self._dec.update(body))[: self.sid_len]
        return self._four_pass_decrypt(body)

    # ------------------------------------------------------------------ the server's side

    def encode(self, server_id: bytes, nonce: bytes, length_bits: int | None = None) -> bytes:
        """A connection ID for `server_id` with `nonce`; the first octet's low five bits say the
        length that follows unless `length_bits` gives them (section 2.3)."""
        if len(server_id) != self.sid_len or len(nonce) != self.nonce_len:
            raise ValueError("server ID or nonce of the wrong length")
        low = self.length if length_bits is None else length_bits
        first = bytes([self.config_id << 5 | (low & 0x1F)])
        plain = server_id + nonce
        if self._enc is None:
            return first + plain
        if self.length == 16:
            return first + bytes(self._enc.update(plain))
        return first + self._four_pass_encrypt(plain)

    # ------------------------------------------------------------------ the Feistel network
    # The halves are held as integers (XOR and the odd length's nibble masks are then one
    # operation each: a new flow's decode is ~1 us, most of it the three AES calls).

    def _round(self, half: int, pass_: int) -> int:
        """AES-ECB of expand(length, pass, half), truncated to a half (4.3.2.2)."""
        h = self._half
        block = half.to_bytes(h, "big") + self._tails[pass_]
        return int.from_bytes(self._enc.update(block)[:h], "big")

    def _halves(self, body: bytes) -> tuple[int, int]:
        h = self._half
        left = int.from_bytes(body[:h], "big") & self._ml
        return left, int.from_bytes(body[self.length - h :], "big") & self._mr

    def _join(self, left: int, right: int) -> bytes:
        h = self._half
        if self.length % 2:  # the middle octet: the left's high nibble, the right's low one
            return ((left << (8 * h - 8)) | right).to_bytes(self.length, "big")
        return left.to_bytes(h, "big") + right.to_bytes(h, "big")

    def _passes(self, left: int, right: int, passes: tuple[int, ...]) -> tuple[int, int]:
        """The Feistel rounds, in the order given: an odd pass XORs the right half with the
        round of the left (4.3.2.3, steps 3-5 and 8-9), an even one the left with the round of
        the right (steps 6-7 and 10-11). Encryption runs 1-4; decryption undoes them, 4-1."""
        ml, mr, f = self._ml, self._mr, self._round
        for p in passes:
            if p % 2:
                right = (right ^ f(left, p)) & mr
            else:
                left = (left ^ f(right, p)) & ml
        return left, right

    def _four_pass_encrypt(self, plain: bytes) -> bytes:
        left, right = self._halves(plain)
        return self._join(*self._passes(left, right, (1, 2, 3, 4)))

    def _four_pass_decrypt(self, body: bytes) -> bytes:
        left, right = self._passes(*self._halves(body), (4, 3, 2))
        if self.sid_len <= self._half - (self.length % 2):  # all in left_0, whole octets
            return left.to_bytes(self._half, "big")[: self.sid_len]
        return self._join(*self._passes(left, right, (1,)))[: self.sid_len]


# ---------------------------------------------------------------------- reading a datagram

QUIC_V1 = b"\x00\x00\x00\x01"
# What the first octets say of a packet's destination connection ID (RFC 9000, 17; RFC 8999):
SHORT = 0  # a short header: a CID its server issued
LONG = 1  # a v1 long header of a type whose DCID the server chose (Handshake)
CHOSEN = 2  # a v1 Initial or 0-RTT: the client may have chosen the DCID itself
OTHER = 3  # a long header of a version this does not know: only the invariants are read


def destination_cid(datagram: bytes, short_length: int) -> tuple[bytes, int] | None:
    """The destination connection ID of a QUIC packet and what kind of header carried it
    (SHORT, LONG, CHOSEN, OTHER); None for a datagram too short to carry one. Reads the first
    octets only: a short header's DCID is `short_length` octets (the configuration's whole CID,
    first octet included), a long header's says its own length (RFC 8999, 5.1)."""
    if not datagram:
        return None
    first = datagram[0]
    if not first & 0x80:  # short header (RFC 9000, 17.3): the DCID follows the first octet
        end = 1 + short_length
        return (datagram[1:end], SHORT) if len(datagram) >= end else None
    if len(datagram) < 6:  # first octet, version (4), DCID length
        return None
    n = datagram[5]
    if len(datagram) < 6 + n:
        return None
    dcid = datagram[6 : 6 + n]
    if datagram[1:5] != QUIC_V1:
        return dcid, OTHER
    return dcid, CHOSEN if (first >> 4) & 0x3 in (0, 1) else LONG
