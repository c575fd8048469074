"""Active health probes: one attempt each, returning (passed, what was seen).

Every probe is bounded: the caller wraps it in the check's timeout, replies are read up to
`READ_LIMIT` bytes and no further (a target that floods cannot grow memory), and an exec check's
whole process group is killed when it overstays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl

from ..core.spec import HealthCheckSpec

READ_LIMIT = 64 * 1024


async def probe(
    spec: HealthCheckSpec, address: str, port: int, name: str, hostname: str = ""
) -> tuple[bool, str]:
    """Run one check of `spec` against address:port within spec.timeout (`hostname`: the DNS
    name the address came from, the default Host header and TLS server name)."""
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.type == "exec":
                return await _exec(spec, address, port, name)
            if spec.type == "udp":
                return await _udp(spec, address, port)
            if spec.type == "tcp" and spec.send is None and spec.expect is None:
                return await _connect_only(address, port)
            return await _connect_and_talk(spec, address, port, hostname)
    except TimeoutError:
        return False, f"timed out after {spec.timeout:g}s"
    except (OSError, ssl.SSLError, EOFError) as exc:
        return False, _describe(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # the same words on uvloop and asyncio
    return str(exc) or type(exc).__name__


def payload(text: str) -> bytes:
    """A udp check's datagram: each character up to U+00FF one byte (so YAML's "\\xNN" escapes
    write binary, a DNS query say), anything beyond as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


async def _udp(spec: HealthCheckSpec, address: str, port: int) -> tuple[bool, str]:
    """Send the datagram (`send`, empty by default) on a connected socket and match the first
    answer against `expect`: a backend that is not listening answers with ICMP port
    unreachable, which the socket reports as refused. Without `expect`, silence until nearly
    the timeout also passes (keepalived's UDP_CHECK without require_reply): only an error
    fails."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((address, port))
        await loop.sock_sendall(sock, payload(spec.send or ""))
        if spec.expect is None:
            try:
                async with asyncio.timeout(spec.timeout * 0.8):
                    data = await loop.sock_recv(sock, 65536)
            except TimeoutError:
                return True, "no answer and no ICMP error"
            return True, f"answered {len(data)} bytes"
        data = await loop.sock_recv(sock, 65536)
    pattern = re.compile(payload(spec.expect))
    if pattern.search(data):
        return True, f"reply matched {spec.expect!r}"
    return False, f"reply {data[:60]!r} did not match {spec.expect!r}"


async def _connect_only(address: str, port: int) -> tuple[bool, str]:
    """The cheapest check: a bare protocol, no streams (hundreds of these run every second)."""
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, address, port
    )
    transport.close()
    return True, "connected"


_contexts: dict[bool, ssl.SSLContext] = {}


async def _tls_context(verify: bool) -> ssl.SSLContext:
    """The TLS checks' two client contexts, made once: the verifying one loads the system's
    certificate authorities from disk, in a thread (not at every probe, on the loop); the
    other reads no file at all."""
    context = _contexts.get(verify)
    if context is None:
        if verify:
            context = await asyncio.to_thread(ssl.create_default_context)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context = _contexts.setdefault(verify, context)
    return context


async def _connect_and_talk(
    spec: HealthCheckSpec, address: str, port: int, hostname: str
) -> tuple[bool, str]:
    tls = await _tls_context(spec.verify) if spec.type == "tls" else None
    reader, writer = await asyncio.open_connection(
        address,
        port,
        ssl=tls,
        server_hostname=(spec.server_name or hostname or address) if tls is not None else None,
        limit=READ_LIMIT,
    )
    try:
        if spec.type == "tcp":
            return await _tcp(spec, reader, writer)
        if spec.type == "tls" and spec.path is None:
            return True, "TLS handshake completed"
        return await _http(spec, hostname or address, reader, writer)
    finally:
        writer.close()
        # Not CancelledError: swallowing it here would let a cancelled check loop on forever
        # (the monitor's stop would then wait for it forever).
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _read_some(
    reader: asyncio.StreamReader, until_eof: bool, pattern: re.Pattern[bytes] | None
) -> bytes:
    """Read up to READ_LIMIT bytes: until EOF, or until `pattern` matches."""
    data = b""
    while len(data) < READ_LIMIT:
        chunk = await reader.read(READ_LIMIT - len(data))
        if not chunk:
            break
        data += chunk
        if pattern is not None and pattern.search(data):
            break
        if not until_eof and pattern is None:
            break
    return data


async def _tcp(
    spec: HealthCheckSpec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bool, str]:
    if spec.send is not None:
        writer.write(spec.send.encode())
        await writer.drain()
    if spec.expect is None:
        return True, "connected"
    pattern = re.compile(spec.expect.encode())
    data = await _read_some(reader, until_eof=False, pattern=pattern)
    if pattern.search(data):
        return True, f"reply matched {spec.expect!r}"
    return False, f"reply {data[:60]!r} did not match {spec.expect!r}"


_STATUS_RE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")


async def _http(
    spec: HealthCheckSpec, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bool, str]:
    host = spec.host or (f"[{address}]" if ":" in address else address)
    writer.write(
        f"GET {spec.path or '/'} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: l4lb-health-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    need_body = spec.body is not None
    data = await _read_some(
        reader, until_eof=need_body, pattern=None if need_body else re.compile(rb"\r?\n")
    )
    m = _STATUS_RE.match(data)
    if m is None:
        return False, f"not an HTTP answer: {data[:40]!r}"
    status = int(m.group(1))
    if status not in spec.status:
        return False, f"HTTP {status}"
    if spec.body is not None:
        _, _, body = data.partition(b"\r\n\r\n")
        if spec.body.encode() not in body:
            return False, f"HTTP {status} without {spec.body!r} in the body"
    return True, f"HTTP {status}"


async def _exec(spec: HealthCheckSpec, address: str, port: int, name: str) -> tuple[bool, str]:
    env = dict(
        os.environ,
        L4LB_BACKEND_NAME=name,
        L4LB_BACKEND_ADDRESS=address,
        L4LB_BACKEND_PORT=str(port),
    )
    proc = await asyncio.create_subprocess_exec(
        *spec.command,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so that we can kill all it forked
    )
    try:
        code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.shield(proc.wait())
        raise
    return code == 0, f"exit status {code}"
