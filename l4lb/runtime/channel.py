"""The supervisor's channel to one worker: JSON messages with file descriptors attached, over a
SOCK_SEQPACKET socket pair (one message a packet, so no framing of our own)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any

log = logging.getLogger("l4lb.control")
MAX_MESSAGE = 1 << 18  # larger packets would be cut short: senders keep theirs smaller
MAX_FDS = 253  # SCM_MAX_FD


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Channel:
    """One end of a pair, driven by the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbox: asyncio.Queue[tuple[dict[str, Any], list[int]] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False
        self.gone = asyncio.Event()

    def _readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            # Received descriptors come inheritable (no MSG_CMSG_CLOEXEC in recv_fds), and a
            # child spawned later would keep a copy of each: a connection that never closes,
            # a successor's hand-over that never fails. Only `pass_fds` passes one on.
            os.set_inheritable(fd, False)
        if not data:  # the other end is gone
            for fd in fds:
                os.close(fd)
            self.close()
            return
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("dropped a control message that is not JSON (%d bytes)", len(data))
            for fd in fds:
                socket.close(fd)
            return
        self._inbox.put_nowait((message, fds))

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> bool:
        """False when the other end is gone."""
        if self.closed:
            return False
        data = json.dumps(message).encode()
        try:
            if fds:
                for i in range(0, len(fds), MAX_FDS):  # more fds than one message takes
                    part = fds[i : i + MAX_FDS]
                    more = dict(message, more=i + MAX_FDS < len(fds))
                    socket.send_fds(self.sock, [json.dumps(more).encode()], part)
            else:
                self.sock.send(data)
        except OSError:
            self.close()
            return False
        return True

    async def deliver(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send, waiting while the other end's buffer is full (a large hand-over); OSError
        when the other end is gone. Descriptors beyond one packet's go in packets of their
        own, as `send` sends them."""
        fds = fds or []
        packets = [(message, fds[i : i + MAX_FDS]) for i in range(0, len(fds), MAX_FDS)]
        if not packets:
            packets = [(message, [])]
        for i, (msg, part) in enumerate(packets):
            data = json.dumps(dict(msg, more=i + 1 < len(packets)) if len(packets) > 1 else msg)
            while True:
                if self.closed:
                    raise ConnectionResetError("the other end is gone")
                try:
                    socket.send_fds(self.sock, [data.encode()], part)
                    break
                except BlockingIOError:
                    ready = self._loop.create_future()
                    self._loop.add_writer(self.sock.fileno(), ready.set_result, None)
                    try:
                        await ready
                    finally:
                        self._loop.remove_writer(self.sock.fileno())

    async def recv(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its descriptors; None once the other end has gone."""
        if self.closed and self._inbox.empty():
            return None
        item = await self._inbox.get()
        if item is None:
            return None
        message, fds = item
        while message.get("more"):  # descriptors that needed several packets
            nxt = await self._inbox.get()
            if nxt is None:
                break
            message, extra = nxt
            fds += extra
        return message, fds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._inbox.put_nowait(None)
        self.gone.set()
