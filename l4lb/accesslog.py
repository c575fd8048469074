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
from typing import TYPE_CHECKING

from .config import AccessLogSpec

if TYPE_CHECKING:
    from .backends import Backend
    from .routing import Route, Router

log = logging.getLogger("l4lb.accesslog")

MAX_PENDING = 64 * 1024 * 1024 // 256  # lines held while the output is slow: about 64 MiB
FLUSH_DELAY = 0.05  # seconds a line may wait, so that one write carries many lines
FLUSH_LINES = 256  # or this many lines, whichever comes first


class Record:
    """What one connection did, for its log line: routing's outcome is kept as text already
    (`middle`, from `AccessLog.middle`), the rest as numbers until the line is made."""

    __slots__ = ("arrived", "client", "connected_at", "middle", "peer", "started", "termination")

    def __init__(self, peer: tuple[str, int] | None, now: float) -> None:
        self.peer = peer  # the socket's peer
        self.client: tuple[str, int] | None = None  # a PROXY header's source, when it differs
        self.started = now  # time.monotonic() of the accept
        self.connected_at = 0.0
        self.arrived = ""  # the name of the pin the connection arrived with
        self.middle = ""
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

    def iso(self, ms: int) -> str:
        """ISO 8601 in UTC with milliseconds, for milliseconds since the epoch."""
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


def outcome(router: Router, route: Route, backend: Backend, arrived: str) -> tuple[str, str]:
    """(affinity, repin_reason) of a connection or flow that reached `backend`, having arrived
    with a pin to `arrived` ("" for none)."""
    if router.table is None:
        return "none", ""
    if backend is router.sorry:
        return "sorry", ""
    if route.entry is None:
        return "unpinned", ""
    if route.reason == "full":
        return "full", "full"
    if not arrived:
        return "new", ""
    if arrived == backend.name:
        return "hit", ""
    return "repin", route.reason or "failed"


def address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host(addr: tuple[str, int] | None) -> tuple[str, int]:
    if addr is None:
        return "", 0
    host = addr[0]
    return (host[7:] if host.startswith("::ffff:") else host), addr[1]


class AccessLog:
    """A bounded, non-blocking line writer flushed by the event loop, and the maker of its
    lines.

    A line is most of the log's cost, so most of it is made once and reused: what routing
    decided (group, port, affinity, backend and its address, tries) is a small set of values
    across connections, cached as text (`middle`), and so is the end of the line (termination,
    worker); per line only the time, the client and five numbers are formatted. Times are whole
    milliseconds, as HAProxy's tcplog and Envoy's %DURATION% give them (a float's formatting
    costs as much as the rest of the line).
    """

    def __init__(
        self, spec: AccessLogSpec, worker: int | None = None, max_pending: int = MAX_PENDING
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._pending: list[str] = []
        self._waiting = False  # the descriptor was full: the loop tells us when it is not
        self._limit = min(FLUSH_LINES, max_pending)  # lines that make a flush (while waiting:
        # lines that may be held)
        self._tail = b""  # the part of a line a partial write left
        self._fd = -1
        self._own = False
        self._json = spec.format != "text"
        self._middles: dict[tuple[object, ...], str] = {}
        self._tails: dict[str, str] = {}
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

    def middle(
        self,
        group: str,
        port: int,
        affinity: str,
        reason: str,
        backend: Backend | None,
        tries: int,
        udp: bool = False,
    ) -> str:
        """Routing's outcome as text, made once for each distinct outcome (`udp`: of a flow,
        whose line says `"protocol":"udp"`; a TCP line says no protocol)."""
        address = backend.address if backend is not None else ""
        key = (group, port, affinity, reason, backend, address, tries, udp)
        text = self._middles.get(key)
        if text is not None:
            return text
        if len(self._middles) >= 10_000:  # backends come and go with reloads: stay bounded
            self._middles.clear()
        where = ""
        if backend is not None:
            where = address_text(
                address, backend.udp_port_for(port) if udp else backend.port_for(port)
            )
        name = backend.name if backend is not None else ""
        if self._json:
            text = (
                f'"group":"{group}","port":{port}'
                + (',"protocol":"udp"' if udp else "")
                + f',"affinity":"{affinity}"'
                + (f',"repin_reason":"{reason}"' if reason else "")
                + (
                    f',"backend":"{name}","backend_address":"{where}"'
                    if name
                    else ',"backend":null'
                )
                + f',"tries":{tries}'
            )
        else:
            pin = f"{affinity}({reason})" if reason else affinity
            to = f"{name}@{where}" if name else "-"
            text = f"{group}:{port}{'/udp' if udp else ''} -> {to} affinity={pin} tries={tries}"
        self._middles[key] = text
        return text

    def forget(self) -> None:
        """After a reload: the cached texts may name backends that changed."""
        self._middles.clear()

    def _make_tail(self, termination: str) -> str:
        worker = self.worker
        if self._json:
            text = f',"termination":"{termination}"' if termination else ""
            text += f',"worker":{worker}}}' if worker is not None else "}"
        else:
            text = f" end {termination}" if termination else " connect open"
            text += f" worker={worker}" if worker is not None else ""
        self._tails[termination] = text
        return text

    def log(self, rec: Record, now: float, bytes_in: int, bytes_out: int, end: bool) -> None:
        """Queue the line for `rec`: at its end (`end`), or when it is established."""
        pending = self._pending
        if len(pending) >= self._limit:
            if self._waiting:  # full while the output is slow: dropped, counted
                self.dropped += 1
                return
            self.flush()
            pending = self._pending
        peer = rec.peer or ("", 0)
        peer_host, peer_port = peer
        if peer_host.startswith("::ffff:"):
            peer_host = peer_host[7:]
        via = rec.client
        if via is None:
            client, client_port = peer_host, peer_port
        else:
            client, client_port = via[0].removeprefix("::ffff:"), via[1]
        started = rec.started
        connected = rec.connected_at
        connect_ms = int((connected - started) * 1000) if connected else None
        duration_ms = int((now - started) * 1000)
        termination = (rec.termination or "unknown") if end else ""
        tail = self._tails.get(termination) or self._make_tail(termination)
        clock = CLOCK  # (CLOCK.iso, inline: a call costs as much as the rest of it)
        ms = int((now + clock.offset) * 1000)
        when = clock.whole if ms == clock.ms else clock.iso(ms)
        if self._json:
            event = "end" if end else "connect"
            extra = f',"peer":"{peer_host}","peer_port":{peer_port}' if via is not None else ""
            pending.append(
                f'{{"time":"{when}","event":"{event}","client":"{client}",'
                f'"client_port":{client_port}{extra},{rec.middle},'
                f'"connect_ms":{"null" if connect_ms is None else connect_ms},'
                f'"duration_ms":{duration_ms},"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
                f"{tail}"
            )
        else:
            extra = f" (via {peer_host}:{peer_port})" if via is not None else ""
            pending.append(
                f"{when} {client}:{client_port}{extra} -> {rec.middle}"
                f" connect_ms={'-' if connect_ms is None else connect_ms}"
                f" duration_ms={duration_ms} bytes_in={bytes_in} bytes_out={bytes_out}{tail}"
            )
        if len(pending) == 1 and not self._waiting:  # a new batch: flushed in FLUSH_DELAY
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
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
            self._limit = self.max_pending
            try:
                asyncio.get_running_loop().add_writer(self._fd, self._writable)
            except (NotImplementedError, ValueError, OSError):  # cannot be watched: the next
                self._waiting = False  # flush tries again
                self._limit = min(FLUSH_LINES, self.max_pending)

    def _writable(self) -> None:
        self._unwatch(self._fd)
        self.flush()

    def _unwatch(self, fd: int) -> None:
        if self._waiting:
            self._waiting = False
            self._limit = min(FLUSH_LINES, self.max_pending)
            with contextlib.suppress(NotImplementedError, ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_writer(fd)
