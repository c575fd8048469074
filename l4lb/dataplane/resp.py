"""The shared store's reply parser: redis-py's RESP2 parser with bounds on what one reply may
announce, so that a Redis that lies (or something else on its port) cannot make l4lb allocate
what it says. Every reply l4lb reads is a pin (a backend's name), an integer, OK or a short
list; a bulk string or an array over the bounds is a protocol error, which fails the command
and closes that connection before anything of the reply is read. Imported only with a store."""

from __future__ import annotations

from redis._parsers import _AsyncRESP2Parser
from redis.exceptions import InvalidResponse

MAX_BULK = 1 << 20  # bytes of one string (the largest: CLUSTER NODES of a large cluster)
MAX_ITEMS = 1 << 16  # elements of one array (CLUSTER SLOTS)


class BoundedParser(_AsyncRESP2Parser):
    async def _readline(self) -> bytes:
        line: bytes = await super()._readline()
        kind = line[:1]
        if kind in (b"$", b"*") and line[1:2] != b"-":
            try:
                n = int(line[1:])
            except ValueError:
                raise InvalidResponse(f"a malformed length {line[:32]!r}") from None
            if n > (MAX_BULK if kind == b"$" else MAX_ITEMS):
                what = "string" if kind == b"$" else "array"
                raise InvalidResponse(f"a reply announcing a {what} of {n} (refused)")
        return line
