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
import math
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
    """What one connection or flow did, for its log line. Times are the event loop's clock
    (`loop.time()`: whole milliseconds under uvloop, as HAProxy's `now_ms`); routing's outcome
    is kept as text already (`middle`, from `AccessLog.middle`); the client a PROXY header
    named is the connection's own `client_addr`, handed to `AccessLog.log`."""

    __slots__ = ("arrived", "connected_at", "middle", "peer", "started", "termination")

    def __init__(self, peer: tuple[str, int] | None, started: float) -> None:
        self.peer = peer  # the socket's peer
        self.started = started  # the accept, or the flow's first datagram
        self.arrived = ""  # the name of the pin it arrived with (routing re-pins `route.pinned`)
        self.connected_at = 0.0
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
_NUMBERS = [str(i) for i in range(1000)]
_floor = math.floor
CLOCK = _Clock()


def address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        self._routed: dict[tuple[object, ...], str] = {}  # routing's outcomes, by backend
        self._now = -1.0  # the loop time of the last line, and its wall-clock text
        self._when = ""
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

    def routed(
        self,
        router: Router,
        route: Route,
        backend: Backend,
        port: int,
        arrived: str,
        udp: bool = False,
    ) -> str:
        """The text of routing's outcome for a connection or flow that reached `backend` on
        service `port`, having arrived pinned to `arrived` ("" for none): affinity `hit`,
        `new`, `repin` (with its reason), `unpinned`, `full`, `sorry`, or `none` without
        persistence. A dict lookup once the same outcome has been seen."""
        if router.table is None:
            affinity, reason = "none", ""
        elif backend is router.sorry:
            affinity, reason = "sorry", ""
        elif route.entry is None:
            affinity, reason = "unpinned", ""
        elif route.reason == "full":
            affinity, reason = "full", "full"
        elif not arrived:
            affinity, reason = "new", ""
        elif arrived == backend.name:
            affinity, reason = "hit", ""
        else:
            affinity, reason = "repin", route.reason or "failed"
        tries = len(route.tried)
        text = self._routed.get((backend, port, affinity, reason, tries, udp))
        if text is None:
            text = self.middle(router.name, port, affinity, reason, backend, tries, udp)
            self._routed[(backend, port, affinity, reason, tries, udp)] = text
        return text

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
        """Routing's outcome as text (`udp`: of a flow, whose line says `"protocol":"udp"`; a
        TCP line says no protocol): made once for each distinct outcome."""
        key = (group, port, affinity, reason, backend, tries, udp)
        text = self._middles.get(key)
        if text is not None:
            return text
        if len(self._middles) >= 10_000:  # backends come and go with reloads: stay bounded
            self._middles.clear()
            self._routed.clear()
        where = ""
        if backend is not None:
            where = address_text(
                backend.address, backend.udp_port_for(port) if udp else backend.port_for(port)
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
        self._routed.clear()

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

    def log(
        self,
        rec: Record,
        now: float,
        via: tuple[str, int] | None,
        bytes_in: int,
        bytes_out: int,
        end: bool,
    ) -> None:
        """Queue the line for `rec` at loop time `now`: at its end (`end`), or when it is
        established; `via`: the client a PROXY header named (None: the peer is the client)."""
        pending = self._pending
        if len(pending) >= self._limit:
            if self._waiting:  # full while the output is slow: dropped, counted
                self.dropped += 1
                return
            self.flush()
            pending = self._pending
        if now != self._now:  # (the loop's clock moves in whole milliseconds under uvloop)
            self._now = now
            self._when = CLOCK.iso(int((now + CLOCK.offset) * 1000.0))
        peer_host, peer_port = rec.peer or ("", 0)
        if peer_host[:1] == ":":  # an IPv4 client of a dual-stack listener
            peer_host = peer_host.removeprefix("::ffff:")
        if via is None:
            client, client_port = peer_host, peer_port
        else:
            client, client_port = via[0].removeprefix("::ffff:"), via[1]
        started = rec.started
        # Whole milliseconds, rounded (math.floor: a third of int()'s cost); numbers under 1000
        # are looked up, not formatted (an int's formatting costs as much as ten lookups).
        d = _floor((now - started) * 1000.0 + 0.5)
        connected = rec.connected_at
        c = _floor((connected - started) * 1000.0 + 0.5) if connected else -1
        termination = (rec.termination or "unknown") if end else ""
        tail = self._tails.get(termination) or self._make_tail(termination)
        n = _NUMBERS
        if self._json:
            extra = "" if via is None else f',"peer":"{peer_host}","peer_port":{peer_port}'
            pending.append(
                f'{{"time":"{self._when}","event":"{"end" if end else "connect"}",'
                f'"client":"{client}","client_port":{client_port}{extra},{rec.middle},'
                f'"connect_ms":{"null" if c < 0 else n[c] if c < 1000 else c},'
                f'"duration_ms":{n[d] if d < 1000 else d},'
                f'"bytes_in":{n[bytes_in] if bytes_in < 1000 else bytes_in},'
                f'"bytes_out":{n[bytes_out] if bytes_out < 1000 else bytes_out}{tail}'
            )
        else:
            extra = "" if via is None else f" (via {peer_host}:{peer_port})"
            pending.append(
                f"{self._when} {client}:{client_port}{extra} -> {rec.middle}"
                f" connect_ms={'-' if c < 0 else n[c] if c < 1000 else c}"
                f" duration_ms={n[d] if d < 1000 else d}"
                f" bytes_in={n[bytes_in] if bytes_in < 1000 else bytes_in}"
                f" bytes_out={n[bytes_out] if bytes_out < 1000 else bytes_out}{tail}"
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
