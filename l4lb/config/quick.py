"""The local-development mode: a configuration from command-line flags, no YAML file.

    l4lb run -l 8080 -l 8443 -b 127.0.0.1:9001,9441 -b 127.0.0.1:9002,9442 --persistence 5m/24

Each `-l` is a listening port (or `host:port`) of one group, `local`; each `-b` one backend
(`host:port[,port...]`, the host an IP or a DNS name) with its ports in the order of the `-l`
ports, or one port for all at the same offset; the backends are named b1, b2, ... The flags
become YAML text that the ordinary loader reads (so `--print-config` shows exactly what runs,
and `l4lb check` accepts it); a bad flag is one line naming it. Pure: text in, text out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

DEFAULT_HOST = "127.0.0.1"  # a development balancer listens on this machine only, unless told


class FlagError(ValueError):
    """A flag that cannot be turned into configuration: one line saying which and why."""


def _host_port(text: str, flag: str) -> tuple[str | None, int]:
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d+)|(\d+)", text)
    if m is None:
        raise FlagError(f"{flag} {text}: expected PORT or HOST:PORT ([IPv6]:PORT)")
    port = int(m.group(3) or m.group(4))
    if not 1 <= port <= 65535:
        raise FlagError(f"{flag} {text}: the port must be from 1 to 65535")
    host = m.group(1) or m.group(2)
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise FlagError(f"{flag} {text}: {host} is not an IPv6 address") from None
    return host, port


def _yaml_host(host: str) -> str:
    return f"'[{host}]'" if ":" in host else host


def to_yaml(
    listens: Sequence[str],
    backends: Sequence[str],
    persistence: str | None = None,
    scheduler: str | None = None,
    admin: str | None = None,
    admin_token_file: str | None = None,
) -> str:
    """The YAML the flags amount to; FlagError for a bad one."""
    if not listens:
        raise FlagError("-b needs at least one -l PORT to listen on")
    if not backends:
        raise FlagError("-l needs at least one -b HOST:PORT to send connections to")
    hosts: list[str] = []
    ports: list[str] = []  # as the group's `ports` writes them: 8080, "8443/udp"
    for text in listens:
        bare, udp = (text[:-4], True) if text.lower().endswith("/udp") else (text, False)
        host, port = _host_port(bare, "-l")
        entry = f'"{port}/udp"' if udp else str(port)
        if entry in ports:
            raise FlagError(f"-l {text}: port {port}{'/udp' if udp else ''} is given twice")
        ports.append(entry)
        if host is not None and host not in hosts:
            hosts.append(host)
    if len(hosts) > 1:
        raise FlagError(
            f"-l: one group listens on all its ports at the same address, not at {', '.join(hosts)}"
            " (use a configuration file for more)"
        )
    listen = hosts[0] if hosts else DEFAULT_HOST
    options = {
        "--persistence": persistence,
        "--scheduler": scheduler,
        "--admin": admin,
        "--admin-token-file": admin_token_file,
    }
    said = [*(f"-l {x}" for x in listens), *(f"-b {x}" for x in backends)]
    said += [f"{flag} {value}" for flag, value in options.items() if value is not None]
    lines = [
        "# l4lb run " + " ".join(said),
        "groups:",
        "  local:",
        f"    listen: [{_yaml_host(listen)}]",
        f"    ports: [{', '.join(ports)}]",
    ]
    if scheduler is not None:
        lines.append(f"    scheduler: {scheduler}")
    if persistence is not None:
        lines.append(f"    persistence: {_persistence(persistence)}")
    lines.append("    backends:")
    for i, text in enumerate(backends, 1):
        host_text, sep, rest = text.rpartition(":")
        if not sep or not host_text:
            raise FlagError(f"-b {text}: expected HOST:PORT[,PORT...] (one port per -l port)")
        first, *more = rest.split(",")
        host, port = _host_port(f"{host_text}:{first}", "-b")
        others = [_host_port(f"{host_text}:{p}", "-b")[1] for p in more]
        if others and len(others) + 1 != len(ports):
            raise FlagError(
                f"-b {text}: {len(others) + 1} ports for {len(ports)} -l ports"
                " (give one port per -l port, in their order, or one for all)"
            )
        assert host is not None
        address = f"[{host}]" if ":" in host else host
        if others:
            mapping = ", ".join(
                f"{sp}: {bp}" for sp, bp in zip(ports, [port, *others], strict=True)
            )
            line = f"      - {{name: b{i}, address: '{address}', ports: {{{mapping}}}}}"
        else:
            line = f"      - {{name: b{i}, address: '{address}:{port}'}}"
        lines.append(f"{line}  # -b {text}")
    if admin_token_file is not None and admin is None:
        raise FlagError("--admin-token-file needs --admin [HOST:]PORT")
    if admin is not None:
        host, port = _host_port(admin, "--admin")
        where = f"[{host}]" if host and ":" in host else (host or DEFAULT_HOST)
        token = f", token_file: '{admin_token_file}'" if admin_token_file is not None else ""
        lines.insert(1, f"admin: {{listen: '{where}:{port}'{token}}}")
    return "\n".join(lines) + "\n"


def explain(error: str, text: str) -> str:
    """A loader error about the flags' YAML (`<flags>:7: groups.local...: why`) as the flag
    that made that line: `-b HOST:PORT: why`."""
    m = re.match(r"<flags>:(\d+): [^:]*: (.*)", error)
    if m is None:
        return error
    line = text.splitlines()[int(m.group(1)) - 1] if int(m.group(1)) <= text.count("\n") else ""
    flag = line.partition("  # ")[2]
    return f"{flag}: {m.group(2)}" if flag else error


def _persistence(text: str) -> str:
    """`5m`, `5m/24`, `off`: the group's persistence mapping."""
    if text == "off":
        return "{timeout: 0}"
    timeout, sep, mask = text.partition("/")
    if not re.fullmatch(r"\d+(?:\.\d+)?(?:ms|s|m|h|d)?", timeout) or (
        sep and not re.fullmatch(r"\d{1,3}", mask)
    ):
        raise FlagError(f"--persistence {text}: expected TIMEOUT[/PREFIX] (5m/24), or off")
    if sep and int(mask) > 32:
        raise FlagError(f"--persistence {text}: an IPv4 prefix is 0 to 32 bits")
    return f"{{timeout: {timeout}" + (f", netmask: /{mask}" if sep else "") + "}"
