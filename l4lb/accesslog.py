"""The connection log (`access_log`): one line when a connection ends (and, with
`log_on_connect`, one when it is established), as JSON or as one human line like HAProxy's
tcplog.

Theory of operation
-------------------
The relay keeps a `Record` per connection only in a group whose log is on (a `None` slot
otherwise, so a log that is off costs one test per event). The record learns its facts where
they happen: the accept, the dial's outcome, the first FIN or reset and from which side, or the
reason l4lb itself ended it (idle timeout, shutdown, a refusal). At the end the relay hands it
to the group's `AccessLog`.

Writing never blocks the relay: a line is appended to a bounded buffer, and the loop flushes
the buffer every 50 ms (or at 256 lines) with one `os.write` on a descriptor in non-blocking
mode (a file of our own, or standard output): a system call per line would cost more than the
line. A partial write keeps the rest; a pipe that is full waits for
the loop to say it is writable. When the buffer is full, lines are dropped and counted
(`dropped`), never waited for. SIGUSR1 reopens a file (after logrotate moved it). Standard
error is written as it is (blocking): l4lb's own log shares it, and a non-blocking descriptor
would make its writes fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time

from .config import AccessLogSpec

log = logging.getLogger("l4lb.accesslog")

MAX_PENDING = 64 * 1024 * 1024 // 256  # lines held while the output is slow: about 64 MiB
FLUSH_DELAY = 0.05  # seconds a line may wait, so that one write carries many lines
FLUSH_LINES = 256  # or this many lines, whichever comes first


class Record:
    """What one connection did, for its log line."""

    __slots__ = (
        "affinity",
        "backend",
        "backend_address",
        "client",
        "connected_at",
        "peer",
        "port",
        "repin_reason",
        "started",
        "termination",
        "tries",
    )

    def __init__(self, peer: tuple[str, int] | None, port: int, now: float) -> None:
        self.peer = peer  # the socket's peer
        self.client: tuple[str, int] | None = None  # a PROXY header's source, when it differs
        self.port = port
        self.started = now  # time.monotonic() of the accept
        self.connected_at = 0.0
        self.affinity = "none"
        self.repin_reason = ""
        self.backend: str | None = None
        self.backend_address = ""
        self.tries = 0
        self.termination = ""

    def end(self, how: str) -> None:
        """The first cause of the end wins (a FIN, then the other side's reset, say)."""
        if not self.termination:
            self.termination = how


class _Clock:
    """Wall-clock text for a monotonic time: `time.time()` is read once per flush, not once per
    line (the offset between the clocks moves only when the wall clock is set), strftime once
    a second, and the whole text once a millisecond (lines come in bursts)."""

    __slots__ = ("ms", "offset", "second", "text", "whole")

    def __init__(self) -> None:
        self.offset = 0.0
        self.second = self.ms = -1
        self.text = self.whole = ""
        self.sync()

    def sync(self) -> None:
        self.offset = time.time() - time.monotonic()

    def iso(self, mono: float) -> str:
        """ISO 8601 in UTC with milliseconds."""
        ms = int((mono + self.offset) * 1000)
        if ms == self.ms:
            return self.whole
        second, frac = divmod(ms, 1000)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self.ms = ms
        self.whole = whole = self.text + _MILLIS[frac]
        return whole


_MILLIS = [f".{i:03d}Z" for i in range(1000)]
CLOCK = _Clock()

_ADDRESSES: dict[tuple[str, int], str] = {}  # (host, port) -> "host:port", "[v6]:port"


def address_text(host: str, port: int) -> str:
    """'host:port' for the log, made once per backend and port."""
    text = _ADDRESSES.get((host, port))
    if text is None:
        if len(_ADDRESSES) > 100_000:  # backends come and go with reloads: stay bounded
            _ADDRESSES.clear()
        text = _ADDRESSES[(host, port)] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return text


# The line is most of the log's cost, so it is made with one `%` and few conversions: times
# are whole milliseconds (as HAProxy's tcplog and Envoy's %DURATION% give them; a float's
# formatting costs as much as the rest of the line), and optional parts are empty strings.
_JSON = (
    '{"time":"%s","event":"%s","group":"%s","client":"%s","client_port":%d%s,"port":%d,'
    '"affinity":"%s"%s,"backend":%s,"tries":%d,"connect_ms":%s,"duration_ms":%d,'
    '"bytes_in":%d,"bytes_out":%d%s%s}'
)
_TEXT = (
    "%s %s:%d %s:%d%s -> %s affinity=%s%s tries=%d connect_ms=%s duration_ms=%d"
    " bytes_in=%d bytes_out=%d %s %s%s"
)


def format_line(
    fmt: str,
    event: str,
    group: str,
    rec: Record,
    now: float,
    bytes_in: int,
    bytes_out: int,
    worker: int | None,
) -> str:
    """One line for `rec` ("connect" or "end"). Every value is an IP literal, a number or a
    name checked by the config loader, so JSON needs no escaping beyond what is written."""
    peer = rec.peer or ("", 0)
    peer_host = peer[0]
    if peer_host.startswith("::ffff:"):
        peer_host = peer_host[7:]
    via = rec.client
    if via is None:
        client, client_port = peer_host, peer[1]
    else:
        client, client_port = via[0].removeprefix("::ffff:"), via[1]
    connected = rec.connected_at
    started = rec.started
    if fmt == "text":
        return _TEXT % (
            CLOCK.iso(now),
            group,
            rec.port,
            client,
            client_port,
            "" if via is None else f" (via {peer_host}:{peer[1]})",
            f"{rec.backend}@{rec.backend_address}" if rec.backend else "-",
            rec.affinity,
            f"({rec.repin_reason})" if rec.repin_reason else "",
            rec.tries,
            int((connected - started) * 1000) if connected else "-",
            int((now - started) * 1000),
            bytes_in,
            bytes_out,
            event,
            rec.termination if event == "end" else "open",
            "" if worker is None else f" worker={worker}",
        )
    backend = rec.backend
    return _JSON % (
        CLOCK.iso(now),
        event,
        group,
        client,
        client_port,
        "" if via is None else f',"peer":"{peer_host}","peer_port":{peer[1]}',
        rec.port,
        rec.affinity,
        f',"repin_reason":"{rec.repin_reason}"' if rec.repin_reason else "",
        f'"{backend}","backend_address":"{rec.backend_address}"' if backend else "null",
        rec.tries,
        int((connected - started) * 1000) if connected else "null",
        int((now - started) * 1000),
        bytes_in,
        bytes_out,
        f',"termination":"{rec.termination or "unknown"}"' if event == "end" else "",
        "" if worker is None else f',"worker":{worker}',
    )


class AccessLog:
    """A bounded, non-blocking line writer flushed by the event loop."""

    def __init__(
        self, spec: AccessLogSpec, worker: int | None = None, max_pending: int = MAX_PENDING
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._pending: list[str] = []
        self._flush_scheduled = False
        self._waiting = False  # the descriptor was full: the loop tells us when it is not
        self._tail = b""  # the part of a line a partial write left
        self._fd = -1
        self._own = False
        self._open()

    def _open(self) -> None:
        path = self.spec.path
        if path == "stdout":
            self._fd, self._own = 1, False
            with contextlib.suppress(OSError):
                os.set_blocking(1, False)
        elif path == "stderr":
            self._fd, self._own = 2, False
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
            self._fd, self._own = os.open(path, flags, 0o640), True

    def reopen(self) -> None:
        """After logrotate: a file is opened again at its path (standard streams stay)."""
        if not self._own:
            return
        old = self._fd
        try:
            self._open()
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s", self.spec.path, exc.strerror)
            return
        self._unwatch(old)
        os.close(old)
        log.info("reopened the access log %s", self.spec.path)

    def close(self) -> None:
        self.flush()
        self._unwatch(self._fd)
        if self._own and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, line: str) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        pending = self._pending
        pending.append(line)
        if self._waiting:
            return  # the loop says when the descriptor takes more
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._fd < 0 or not (self._pending or self._tail):
            return
        data = (
            self._tail + ("\n".join(self._pending) + "\n").encode() if self._pending else self._tail
        )
        lines = len(self._pending)
        self._pending = []
        CLOCK.sync()
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # a full disk, a closed pipe: the lines are lost, and counted
            self.dropped += lines
            self._tail = b""
            if exc.errno != errno.EPIPE:
                log.error("cannot write the access log %s: %s", self.spec.path, exc.strerror)
            return
        self.written += lines
        self._tail = data[n:]
        if self._tail and not self._waiting:
            self._waiting = True
            with contextlib.suppress(NotImplementedError, ValueError, OSError):
                asyncio.get_running_loop().add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        self._unwatch(self._fd)
        self.flush()

    def _unwatch(self, fd: int) -> None:
        if self._waiting:
            self._waiting = False
            with contextlib.suppress(NotImplementedError, ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_writer(fd)
