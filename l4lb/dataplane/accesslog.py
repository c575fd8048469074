"""The connection log (`access_log`): one line when a connection ends (and, with
`log_on_connect`, one when it is established), as JSON or as one human line like HAProxy's
tcplog.

Theory of operation
-------------------
Every connection and flow has its record (`core.connection.Conn`), which learns its facts
where they happen: the accept, the dial's outcome (`Routed`, made only in a group whose log is
on: group, port, what became of the pin, the backend's name and address then, tries), its
bytes as they pass, the first FIN or reset and from which side, or the reason l4lb itself
ended it (idle timeout, shutdown, a refusal). At the end the router hands it to the group's
`AccessLog` (`Router.end`).

Lines are made in batches, not one by one: `log` only queues a row (the record, the time, the
counts and how it ended, read when it is queued), and the flush turns
every queued row into its line in one loop. A line's text is a Python f-string either way; made
in a batch it costs no call of its own, its constants are locals, and the texts rows share
(routing's outcome, the time, the end) are made once for the rows that share them rather than
looked up per line. Measured side by side (bench/ab.py), that took the log from 8.5% of a new
connection to 5.5%.

Writing never blocks the relay: rows go to a bounded buffer, and the loop flushes it every
50 ms (or at 256 rows) with one `os.write` on a descriptor in non-blocking mode (a file of our
own, or standard output): a system call per line would cost more than the line. A partial
write keeps the rest; a pipe that is full waits for the loop to say it is writable. When the
buffer is full, lines are dropped and counted (`dropped`), never waited for. SIGUSR1 reopens a
file (after logrotate moved it). Standard error is written as it is (blocking): l4lb's own log
shares it, and a non-blocking descriptor would make its writes fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import time
from collections.abc import Iterable

from ..core.connection import Conn, Routed, unrouted
from ..core.routing import Router
from ..core.spec import AccessLogSpec

log = logging.getLogger("l4lb.accesslog")

MAX_PENDING = 64 * 1024 * 1024 // 512  # rows held while the output is slow: a row and its
# record are about 500 bytes, so about 64 MiB
FLUSH_DELAY = 0.05  # seconds a line may wait, so that one write carries many lines
FLUSH_LINES = 256  # or this many lines, whichever comes first


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
_NOWHERE = ("", 0)
_UNROUTED = unrouted("", 0, 0)
_floor = math.floor
CLOCK = _Clock()


def address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Row = tuple[Conn, float, tuple[str, int] | None, int, int, str | None]


class AccessLog:
    """A bounded, non-blocking line writer flushed by the event loop, and the maker of its
    lines (in batches: see the theory above).

    What routing decided (group, port, affinity, backend and its address, tries) is a small
    set of values across connections, made into text once (`_middle`), and so is the end of a
    line (termination, worker); per line only the time, the client and five numbers are
    formatted. Times are whole milliseconds, as HAProxy's tcplog and Envoy's %DURATION% give
    them (a float's formatting costs as much as the rest of the line).
    """

    def __init__(
        self, spec: AccessLogSpec, worker: int | None = None, max_pending: int = MAX_PENDING
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._rows: list[Row] = []  # lines to make and write: (record, time, PROXY client,
        # bytes in, bytes out, termination; None: a connect line)
        self._waiting = False  # the descriptor was full: the loop tells us when it is not
        self._limit = min(FLUSH_LINES, max_pending)  # rows that make a flush (while waiting:
        # rows that may be held)
        self._tail = b""  # the part of a line a partial write left
        self._fd = -1
        self._own = False
        self._json = spec.format != "text"
        self._middles: dict[Routed, str] = {}
        self._tails: dict[str | None, str] = {}  # line ends, by termination (None: connect)
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

    def forget(self) -> None:
        """After a reload: the cached texts may name backends that changed."""
        self._middles.clear()

    def _middle(self, routed: Routed) -> str:
        """Routing's outcome as text (a UDP flow's line says `"protocol":"udp"`; a TCP line
        says no protocol)."""
        group, port, affinity, reason = routed.group, routed.port, routed.affinity, routed.reason
        name, address, backend_port = routed.backend, routed.address, routed.backend_port
        tries, udp = routed.tries, routed.udp
        sid = ""
        if affinity == "repin":
            reason = reason or "failed"
        elif affinity == "full":
            reason = "full"
        elif affinity == "cid":  # (`reached` put the server ID there)
            sid, reason = reason, ""
        else:
            reason = ""
        where = address_text(address, backend_port)
        if self._json:
            text = (
                f'"group":"{group}","port":{port}'
                + (',"protocol":"udp"' if udp else "")
                + f',"affinity":"{affinity}"'
                + (f',"repin_reason":"{reason}"' if reason else "")
                + (f',"server_id":"{sid}"' if sid else "")
                + (
                    f',"backend":"{name}","backend_address":"{where}"'
                    if name
                    else ',"backend":null'
                )
                + f',"tries":{tries}'
            )
        else:
            pin = f"{affinity}({reason or sid})" if reason or sid else affinity
            to = f"{name}@{where}" if name else "-"
            text = f"{group}:{port}{'/udp' if udp else ''} -> {to} affinity={pin} tries={tries}"
        if len(self._middles) >= 10_000:  # backends come and go with reloads: stay bounded
            self._middles.clear()
        self._middles[routed] = text
        return text

    def _end(self, termination: str | None) -> str:
        """The end of a line, made once per termination (None: a `log_on_connect` line's; ""
        at an end: `unknown`), with the worker."""
        how = (termination or "unknown") if termination is not None else ""
        worker = self.worker
        if self._json:
            text = f',"termination":"{how}"' if how else ""
            text += f',"worker":{worker}}}' if worker is not None else "}"
        else:
            text = f" end {how}" if how else " connect open"
            text += f" worker={worker}" if worker is not None else ""
        self._tails[termination] = text
        return text

    def log(self, conn: Conn, now: float, *, end: bool) -> None:
        """Queue the line for `conn` (its `routed` set) at loop time `now`: at its end (`end`),
        or when it is established. Its counters and end are read now (the record lives on)."""
        rows = self._rows
        if len(rows) >= self._limit:
            if self._waiting:  # full while the output is slow: dropped, counted
                self.dropped += 1
                return
            self.flush()
            rows = self._rows
        rows.append(
            (conn, now, conn.via, conn.bytes_in, conn.bytes_out, conn.termination if end else None)
        )
        if len(rows) == 1 and not self._waiting:  # a new batch: flushed in FLUSH_DELAY
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def _lines(self, rows: list[Row]) -> str:
        """The text of `rows`, a line each (the hot loop: locals, and texts shared by
        consecutive rows made once)."""
        out: list[str] = []
        add = out.append
        n = _NUMBERS
        floor = _floor
        iso = CLOCK.iso
        offset = CLOCK.offset
        middles = self._middles
        tails = self._tails
        json = self._json
        last_now = -1.0
        when = stamp_end = stamp_connect = middle = tail = ""
        last_routed: Routed | None = None
        last_how: str | None = "-"
        for rec, now, via, bytes_in, bytes_out, how in rows:
            if now != last_now:  # (the loop's clock moves in whole milliseconds under uvloop)
                last_now = now
                when = iso(floor((now + offset) * 1000.0))
                stamp_end = f'{{"time":"{when}","event":"end","client":"'
                stamp_connect = f'{{"time":"{when}","event":"connect","client":"'
            routed = rec.routed or _UNROUTED
            if routed != last_routed:
                last_routed = routed
                middle = middles.get(routed) or self._middle(routed)
            if how is not last_how:
                last_how = how
                tail = tails.get(how) or self._end(how)
            peer_host, peer_port = rec.peer or _NOWHERE
            if ":" in peer_host:  # (an IPv4 client of a dual-stack listener: as IPv4)
                peer_host = peer_host.removeprefix("::ffff:")
            started = rec.started
            # Whole milliseconds, rounded (math.floor: a third of int()'s cost); numbers under
            # 1000 are looked up, not formatted (formatting an int costs ten lookups).
            d = floor((now - started) * 1000.0 + 0.5)
            at = rec.connected_at
            c = floor((at - started) * 1000.0 + 0.5) if at else -1
            if via is None:
                client, client_port, extra = peer_host, peer_port, ""
            else:
                client, client_port = via[0].removeprefix("::ffff:"), via[1]
                extra = (
                    f',"peer":"{peer_host}","peer_port":{peer_port}'
                    if json
                    else f" (via {peer_host}:{peer_port})"
                )
            if json:
                add(
                    f'{stamp_connect if how is None else stamp_end}{client}",'
                    f'"client_port":{client_port}{extra},{middle},'
                    f'"connect_ms":{"null" if c < 0 else n[c] if c < 1000 else c},'
                    f'"duration_ms":{n[d] if d < 1000 else d},'
                    f'"bytes_in":{n[bytes_in] if bytes_in < 1000 else bytes_in},'
                    f'"bytes_out":{n[bytes_out] if bytes_out < 1000 else bytes_out}{tail}'
                )
            else:
                add(
                    f"{when} {client}:{client_port}{extra} -> {middle}"
                    f" connect_ms={'-' if c < 0 else n[c] if c < 1000 else c}"
                    f" duration_ms={n[d] if d < 1000 else d}"
                    f" bytes_in={n[bytes_in] if bytes_in < 1000 else bytes_in}"
                    f" bytes_out={n[bytes_out] if bytes_out < 1000 else bytes_out}{tail}"
                )
        add("")
        return "\n".join(out)

    def flush(self) -> None:
        rows = self._rows
        if self._fd < 0 or not (rows or self._tail):
            return
        self._rows = []
        if rows:
            CLOCK.sync()
            data = self._tail + self._lines(rows).encode()
        else:
            data = self._tail
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # a full disk, a closed pipe: the lines are lost, and counted
            self.dropped += len(rows)
            self._tail = b""
            if exc.errno != errno.EPIPE:
                log.error("cannot write the access log %s: %s", self.spec.path, exc.strerror)
            return
        self.written += len(rows)
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


Writers = dict[tuple[str, str], AccessLog]  # by path and format


def attach_writers(routers: Iterable[Router], current: Writers, worker: int | None) -> Writers:
    """Give each router the writer of its group's log: one writer per log path and format,
    shared by the groups that log there; one no group uses any more is closed. (Two formats
    to one path: each group's lines in its own.) An OSError (a log that cannot be opened)
    leaves the routers and the writers as they were, but for the writers already opened."""
    routers = list(routers)
    wanted: Writers = {}
    for router in routers:
        spec = router.spec.access_log
        if spec is None:
            continue
        where = (spec.path, spec.format)
        writer = wanted.get(where) or current.get(where)
        if writer is None:
            writer = AccessLog(spec, worker)
        wanted[where] = writer
    for router in routers:
        spec = router.spec.access_log
        router.log = None if spec is None else wanted[(spec.path, spec.format)]
        router.log_on_connect = spec is not None and spec.log_on_connect
    for writer in wanted.values():
        writer.forget()  # the backends its cached texts name may have changed
    for where, writer in current.items():
        if where not in wanted:
            writer.close()
    return wanted
