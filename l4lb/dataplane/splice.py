"""Zero-copy relaying for bulk flows: `os.splice` from one socket into a pipe and from the pipe
into the other socket, so the bytes never enter Python (Linux only).

Theory of operation
-------------------
A connection starts on the `Protocol` relay. With `relay: auto`, once one direction has carried
`SPLICE_AFTER` bytes, the client side asks to switch; with `relay: splice` it switches as soon as
both sides are paired. Switching must not lose or reorder a byte:

1. Both transports stop reading, and their write-buffer limits drop to zero, so that
   `resume_writing` says exactly when each has flushed what the copy relay gave it.
2. Once both are empty, each socket's descriptor is duplicated. The transports stay open but
   idle (paused, empty): they own the original descriptors and close them at the end.
3. Two pumps run on the duplicates with the loop's `add_reader`/`add_writer`: splice in as much as
   the pipe holds, splice out as much as the peer takes, and wait for whichever side is not
   ready. The bytes in the pipe are counted here, because splice cannot tell "nothing to read"
   from "pipe full" by its EAGAIN.
4. A pump that reads EOF passes it on with `shutdown(SHUT_WR)` once its pipe is empty; when both
   have, or on any error (which resets both sockets, as the copy relay does), everything closes.

A side that has already sent its FIN, or a switch asked for twice, stays on the copy relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

SPLICE_AFTER = 1024 * 1024  # bytes one direction carries before `auto` switches
PIPE_SIZE = 1024 * 1024
CHUNK = 1024 * 1024
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
LINGER_RESET = struct.pack("ii", 1, 0)
AVAILABLE = hasattr(os, "splice")


class Pump:
    """One direction: src socket -> pipe -> dst socket."""

    def __init__(
        self,
        session: SpliceSession,
        src: socket.socket,
        dst: socket.socket,
        count: Callable[[int], None],
    ) -> None:
        self.session = session
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.count = count
        self.rpipe, self.wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.wpipe, _F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.paused = False  # an upgrade is taking the connection: nothing more is read

    def start(self) -> None:
        self._want_read()

    def _want_read(self) -> None:
        loop = self.session.loop
        if self.writing:
            loop.remove_writer(self.dst)
            self.writing = False
        if not self.reading and not self.paused:
            loop.add_reader(self.src, self.on_readable)
            self.reading = True

    def _want_write(self) -> None:
        loop = self.session.loop
        if self.reading:
            loop.remove_reader(self.src)
            self.reading = False
        if not self.writing:
            loop.add_writer(self.dst, self.on_writable)
            self.writing = True

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src, self.wpipe, CHUNK, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.session.fail(exc)
            return
        if n == 0:
            self.eof = True
        else:
            self.in_pipe += n
            self.count(n)
        self.on_writable()

    def on_writable(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.rpipe, self.dst, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._want_write()
                return
            except OSError as exc:
                self.session.fail(exc)
                return
            self.in_pipe -= n
        if self.eof:
            self._finish()
        else:
            self._want_read()

    def _finish(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.dst_sock.shutdown(socket.SHUT_WR)  # pass the FIN on
        self.done = True
        self.session.pump_done()

    def stop(self) -> None:
        loop = self.session.loop
        if self.reading:
            loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.dst)
            self.writing = False

    def close(self) -> None:
        self.stop()
        for fd in (self.rpipe, self.wpipe):
            with contextlib.suppress(OSError):
                os.close(fd)


class SpliceSession:
    """Both directions of one connection, on duplicated descriptors."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_fd: int,
        backend_fd: int,
        on_bytes: tuple[Callable[[int], None], Callable[[int], None]],
        on_end: Callable[[bool], None],
    ) -> None:
        self.loop = loop
        self.socks = (
            socket.socket(fileno=os.dup(client_fd)),
            socket.socket(fileno=os.dup(backend_fd)),
        )
        self.on_end = on_end
        self.pumps = (
            Pump(self, self.socks[0], self.socks[1], on_bytes[0]),
            Pump(self, self.socks[1], self.socks[0], on_bytes[1]),
        )
        self.closed = False

    def start(self) -> None:
        for p in self.pumps:
            p.start()

    def pump_done(self) -> None:
        if all(p.done for p in self.pumps):
            self._close(reset=False)

    def pause(self) -> None:
        """Stop taking bytes in (an upgrade hands the connection over); what the pipes hold is
        still passed on (`flushed` says when it has been)."""
        for p in self.pumps:
            p.paused = True
            if p.reading:
                self.loop.remove_reader(p.src)
                p.reading = False

    def flushed(self) -> bool:
        return all(p.in_pipe == 0 for p in self.pumps)

    def resume(self) -> None:
        """Undo `pause` (the upgrade failed)."""
        for p in self.pumps:
            p.paused = False
            if not p.done and not p.writing:
                p.on_writable()

    def fail(self, exc: OSError) -> None:
        self._close(reset=True)

    def abort(self) -> None:
        self._close(reset=True)

    def close(self) -> None:
        """Both ways at once, with FINs (idle timeout, on_down: close)."""
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        self._close(reset=False)

    def _close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.pumps:
            p.close()
        for s in self.socks:
            if reset:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            s.close()
        self.on_end(reset)
