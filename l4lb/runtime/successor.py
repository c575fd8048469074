"""How an upgrade reaches the new process: started here (`start_successor`, as SIGUSR2 does),
or asking on a Unix socket (`SuccessorSocket`, `connect_to`: a new container's); what it
answers, or why it went away; and what each refusal says. The hand-over itself is
runtime/handover.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .channel import Channel, pair
from .errors import UpgradeError

log = logging.getLogger("l4lb.upgrade")


def upgrade_argv() -> list[str]:
    """The command that started this process, as the l4lb installed now runs it (without
    `--take-over`: its successor is handed everything by this process, over a pair)."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--take-over":
            skip = True
        elif not arg.startswith("--take-over="):
            argv.append(arg)
    return [sys.executable, "-m", "l4lb", *argv]


class SuccessorSocket:
    """`--handover-socket PATH`: where an l4lb this process did not start (a new container's on
    the same host, through a shared volume) asks for everything: `l4lb run --take-over PATH`.
    The hand-over is an upgrade's (the same format, checks and undo), over the accepted
    connection instead of a pair: `take` is the process's upgrade, given that channel. The
    socket is 0600: whoever may connect may take every connection this process serves."""

    def __init__(self, path: str, take: Callable[[Channel], Awaitable[str]]) -> None:
        self.path = path
        self.take = take
        self.sock: socket.socket | None = None
        self.inode = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        """Listen at the path (a file left there by a process gone, or by the one this
        process took over from, is replaced). OSError when it cannot."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            sock.listen(4)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.inode = os.stat(self.path).st_ino
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("handover socket %s: %s", self.path, exc.strerror or exc)
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        log.info("a new l4lb asks to take over on %s", self.path)
        channel = Channel(conn)
        try:
            await self.take(channel)
        except UpgradeError:  # (said by the process's upgrade: it serves on)
            channel.close()

    def close(self) -> None:
        if self.sock is None:
            return
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:  # (not a successor's)
                os.unlink(self.path)


def connect_to(path: str) -> int:
    """`--take-over PATH`: the hand-over's channel to the l4lb listening there, as a
    descriptor. OSError when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock.detach()


async def start_successor(
    argv: list[str], errors: Any
) -> tuple[asyncio.subprocess.Process, Channel]:
    """Start `argv` with `--takeover-fd`: its standard error to `errors` (a file) until its
    configuration is loaded, then to this process's own. The process, and the channel to it."""
    a, b = pair()
    err = os.dup(sys.stderr.fileno())  # (at a number of its own: the child's 2 is a file)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--takeover-fd",
            str(b.fileno()),
            "--takeover-stderr",
            str(err),
            pass_fds=(b.fileno(), err),
            stderr=errors,
        )
    except BaseException:
        a.close()
        raise
    finally:
        b.close()
        os.close(err)
    return proc, Channel(a)


async def expect(
    channel: Channel, kind: str, proc: asyncio.subprocess.Process | None, errors: Any
) -> dict[str, Any]:
    """The new process's next message, of `kind`; UpgradeError, saying why, for anything else
    (its `error`, or its going away: `proc`, when started here, and its standard error)."""
    got = await channel.recv()
    if got is None:
        raise UpgradeError(await why_gone(proc, errors))
    message, fds = got
    for fd in fds:
        os.close(fd)
    if message.get("t") == "error":
        raise UpgradeError(f"the new process: {str(message.get('why'))[:300]}")
    if message.get("t") != kind:
        raise UpgradeError(f"the new process said {str(message.get('t'))[:40]!r}, not {kind}")
    return message


async def why_gone(proc: asyncio.subprocess.Process | None, errors: Any) -> str:
    """Why the new process went away before it answered: its last line, and its status."""
    if proc is None:  # (not started here: a worker's successor, or one that asked)
        return "the new process went away before it took over"
    status = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            status = await proc.wait()
    errors.seek(0)
    lines = [x for x in errors.read()[-4096:].decode(errors="replace").splitlines() if x]
    last = lines[-1].strip() if lines else "no message"
    return f"the new process exited (status {status}) before it took over: {last}"


async def kill_started(proc: asyncio.subprocess.Process | None) -> None:
    """A failed upgrade's new process, if this one started it: killed, and waited for."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5.0):
            await proc.wait()


def changing_workers(ours: int, theirs: int) -> str:
    return (
        f"changing workers ({ours} -> {theirs}) takes a restart with this new l4lb: it cannot"
        " take one process over as workers, or workers as one process (an older release)"
    )


def int_or(v: object, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default
