"""Reading the small files a configuration names (the configuration itself, a token, a QUIC-LB
key, a state file): regular files only, bounded in size, never blocking on the open.

A FIFO, a device or a directory named where a file is expected is refused at once, with a line
that says so: `open` uses O_NONBLOCK (a FIFO with no writer would otherwise block the opener
forever) and the descriptor's `fstat` must say a regular file before a byte is read. A file
larger than its bound is refused before it is read whole (`/dev/zero` cannot reach the reader,
and a file that grew past any sane size is not one of ours). These calls still block on a slow
disk: callers on the event loop run them in a thread (`asyncio.to_thread`)."""

from __future__ import annotations

import errno
import os
import stat

SMALL = 1 << 20  # a configuration, a token or a key: 1 MiB is far past any real one


class FileRefused(OSError):
    """Not a regular file, or over its bound; `strerror` says which, for a one-line error."""


def read_file(path: str | os.PathLike[str], limit: int = SMALL) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them; OSError otherwise
    (FileRefused for the two refusals above, with a `strerror` fit for a one-line message)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(errno.EINVAL, "not a regular file", os.fspath(path))
        if st.st_size > limit:
            raise FileRefused(errno.EFBIG, f"over {_size(limit)}", os.fspath(path))
        chunks: list[bytes] = []
        got = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:  # (it grew since fstat)
                raise FileRefused(errno.EFBIG, f"over {_size(limit)}", os.fspath(path))
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str], limit: int = SMALL) -> str:
    """`read_file` as UTF-8 text (UnicodeDecodeError when it is not)."""
    return read_file(path, limit).decode("utf-8")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"
