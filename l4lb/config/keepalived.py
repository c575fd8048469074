"""`l4lb import-keepalived`: the virtual servers of a keepalived.conf as an l4lb configuration.

Keepalived's format is a tree of statements: a keyword, its arguments to the end of the line,
and optionally a `{ ... }` block. `!` and `#` start comments; `include GLOB` splices other files
in (relative to the including file). The converter walks the `virtual_server` and
`virtual_server_group` blocks; every option it cannot carry over becomes a YAML comment at the
place it would go, so that nothing is dropped silently. Keepalived's defaults apply where the file
is silent: no persistence unless `persistence_timeout` or `persistence_granularity` is given
(then 360 s by default, /32), `wlc`, checks every `delay_loop` (60 s), `connect_timeout` 5 s,
`retry` 1.
"""

from __future__ import annotations

import glob
import ipaddress
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .files import read_text

SCHEDULERS = {
    "rr": "rr",
    "wrr": "wrr",
    "lc": "lc",
    "wlc": "wlc",
    "sh": "sh",
    "mh": "mh",
    "fo": "fo",
    "twos": "p2c",
}


KEEPALIVED_LIMIT = 16 << 20  # bytes of one keepalived.conf or included file


class KeepalivedError(Exception):
    """The file cannot be read or parsed; the message is one line with the file and line."""


@dataclass
class Node:
    keyword: str
    args: list[str]
    line: int
    source: str
    children: list[Node] | None = None

    def child(self, keyword: str) -> Node | None:
        return next((c for c in self.children or () if c.keyword == keyword), None)

    def all(self, keyword: str) -> list[Node]:
        return [c for c in self.children or () if c.keyword == keyword]


@dataclass
class _Token:
    text: str
    line: int
    source: str


def _tokens(path: Path, seen: set[Path]) -> list[_Token | None]:
    """Words and braces; None marks an end of line. Includes are expanded in place."""
    if path in seen:
        raise KeepalivedError(f"{path}: included twice (a loop?)")
    seen = seen | {path}
    try:
        text = read_text(path, KEEPALIVED_LIMIT)
    except (OSError, UnicodeDecodeError) as exc:
        raise KeepalivedError(
            f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    out: list[_Token | None] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.split(r"[!#]", raw, maxsplit=1)[0]
        words = re.findall(r'"[^"]*"|[{}]|[^\s{}"]+', line)
        if words and words[0] == "include":
            for name in words[1:]:
                pattern = name.strip('"')
                matches = sorted(
                    glob.glob(
                        str(path.parent / pattern) if not Path(pattern).is_absolute() else pattern
                    )
                )
                for m in matches:
                    out += _tokens(Path(m), seen)
            continue
        out += [_Token(w.strip('"') if w.startswith('"') else w, n, str(path)) for w in words]
        out.append(None)
    return out


def parse(path: str | Path) -> list[Node]:
    tokens = _tokens(Path(path), set())
    pos = 0

    def block(depth: int) -> list[Node]:
        nonlocal pos
        nodes: list[Node] = []
        current: Node | None = None
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok is None:
                current = None
            elif tok.text == "{":
                target = current if current is not None else (nodes[-1] if nodes else None)
                if target is None:
                    raise KeepalivedError(f"{tok.source}:{tok.line}: a block without a keyword")
                target.children = block(depth + 1)
                current = None
            elif tok.text == "}":
                if depth == 0:
                    raise KeepalivedError(f"{tok.source}:{tok.line}: an unmatched closing brace")
                return nodes
            elif current is None:
                current = Node(tok.text, [], tok.line, tok.source)
                nodes.append(current)
            else:
                current.args.append(tok.text)
        if depth:
            raise KeepalivedError(f"{path}: the file ends inside a block")
        return nodes

    return block(0)


@dataclass
class _Out:
    lines: list[str] = field(default_factory=list)
    notes: int = 0
    kernel: bool = False  # fwmark services become kernel_mark groups

    def add(self, indent: int, text: str) -> None:
        self.lines.append("  " * indent + text)

    def note(self, indent: int, node: Node, why: str) -> None:
        what = " ".join([node.keyword, *node.args])
        self.add(indent, f"# not carried over ({node.source}:{node.line}): {what}: {why}")
        self.notes += 1

    def change(self, indent: int, node: Node, why: str) -> None:
        """Carried over, but not as written: each such comment begins `# changed`."""
        what = " ".join([node.keyword, *node.args])
        self.add(indent, f"# changed ({node.source}:{node.line}): {what}: {why}")
        self.notes += 1


def _seconds(node: Node | None, default: float) -> float:
    if node is None or not node.args:
        return default
    try:
        return float(node.args[0])
    except ValueError:
        return default


_CHECKS = {"TCP_CHECK", "HTTP_GET", "SSL_GET", "MISC_CHECK", "SMTP_CHECK", "UDP_CHECK"}
# Checkers l4lb has no equivalent for: each is a counted comment (the backend then has the
# other checkers' verdict, or none).
_OTHER_CHECKS = {"PING_CHECK", "DNS_CHECK", "BFD_CHECK", "FILE_CHECK"}
_VS_DONE = {
    "delay_loop",
    "lb_algo",
    "lvs_sched",
    "persistence_timeout",
    "persistence_granularity",
    "protocol",
    "real_server",
    "sorry_server",
    "quorum",
    "hysteresis",
    "lb_kind",
    "lvs_method",
    "virtualhost",
}


def _weight(rs: Node) -> int:
    node = rs.child("weight")
    return int(node.args[0]) if node is not None and node.args and node.args[0].isdigit() else 1


def _is_own(rs: Node, listen: list[str], ports: list[int]) -> bool:
    """A real server that is the virtual server's own address and port."""
    try:
        address, rs_port = _addr_port(rs.args)
    except (ValueError, IndexError):
        return False
    return address in listen and (rs_port or 0) in (ports if rs_port else [0])


_CHECK_TIMING = ("connect_timeout", "retry", "nb_get_retry", "delay_before_retry", "warmup")
_STATUS_RE = re.compile(r"^(\d{3})(?:-(\d{3}))?$")


def _check(
    out: _Out, rs: Node, rs_port: int | None, delay: float, indent: int, vhost: str | None
) -> None:
    for other in rs.children or ():
        if other.keyword in _OTHER_CHECKS:
            out.note(
                indent, other, "l4lb has no such check (tcp, udp, http, tls and exec are its own)"
            )
    checks = [c for c in rs.children or () if c.keyword in _CHECKS]
    if not checks:
        return
    chk = checks[0]
    for extra in checks[1:]:
        out.note(indent, extra, "l4lb runs one check a backend (keepalived requires all to pass)")
    fields = _timing(out, chk, rs_port, delay, indent)
    handled = {*_CHECK_TIMING, "connect_port"}
    if chk.keyword == "TCP_CHECK":
        kind = "tcp"
    elif chk.keyword == "UDP_CHECK":
        kind = "udp"
        _udp_check(out, chk, indent, fields, handled)
    elif chk.keyword == "SMTP_CHECK":
        kind = "tcp"
        fields.append('expect: "^220"')  # the server's greeting; l4lb sends no HELO
        handled.add("helo_name")
        helo = chk.child("helo_name")
        if helo is not None:
            out.note(indent, helo, "l4lb reads the SMTP greeting and sends no HELO")
    elif chk.keyword in ("HTTP_GET", "SSL_GET"):
        kind = "http" if chk.keyword == "HTTP_GET" else "tls"
        _http_check(out, chk, indent, vhost, fields, handled)
    else:
        kind = "exec"
        if not _misc_check(out, chk, delay, indent, fields, handled):
            return
    for sub in chk.children or []:
        if sub.keyword not in handled:
            out.note(indent, sub, "no l4lb equivalent")
    out.add(indent, f"health_check: {{type: {kind}, " + ", ".join(fields) + "}")


def _timing(out: _Out, chk: Node, rs_port: int | None, delay: float, indent: int) -> list[str]:
    """A check's interval, timeout, rise and fall, with notes for the timing l4lb does not
    take."""
    # keepalived's defaults: connect_timeout 5 s, retry 1 (MISC_CHECK 0) extra attempts
    timeout = _seconds(chk.child("connect_timeout"), 5.0)
    retry_node = chk.child("retry") or chk.child("nb_get_retry")
    fall = int(_seconds(retry_node, 0.0 if chk.keyword == "MISC_CHECK" else 1.0)) + 1
    fields = [f"interval: {delay:g}s", f"timeout: {timeout:g}s", "rise: 1", f"fall: {fall}"]
    connect_port = chk.child("connect_port")
    if (
        connect_port is not None
        and connect_port.args
        and rs_port is not None
        and connect_port.args[0] != str(rs_port)
    ):
        out.note(
            indent,
            connect_port,
            "l4lb checks the port traffic goes to; add a group port mapped to it to check another",
        )
    for timing in ("delay_before_retry", "warmup"):
        node = chk.child(timing)
        if node is not None:
            out.note(indent, node, "l4lb retries at its interval and spreads first checks itself")
    return fields


def _udp_check(out: _Out, chk: Node, indent: int, fields: list[str], handled: set[str]) -> None:
    handled |= {"payload", "require_reply"}
    for option, key in (("payload", "send"), ("require_reply", "expect")):
        node = chk.child(option)
        if node is None or not node.args:
            continue
        try:
            data = bytes.fromhex("".join(node.args))
        except ValueError:
            out.note(indent, node, f"{option} is not hex: left out")
            continue
        escaped = "".join(f"\\x{b:02x}" for b in data)
        # send: YAML's escapes make the bytes; expect: a regex of them, from the start
        fields.append(f'send: "{escaped}"' if key == "send" else f"expect: '^{escaped}'")


def _http_check(
    out: _Out, chk: Node, indent: int, vhost: str | None, fields: list[str], handled: set[str]
) -> None:
    handled |= {"url", "virtualhost"}
    urls = chk.all("url")
    url = urls[0] if urls else None
    path = url.child("path") if url else None
    fields.append(f"path: {_q(path.args[0]) if path and path.args else _q('/')}")
    fields.append(f"status: [{_statuses(out, indent, url)}]")
    host = (url.child("virtualhost") if url else None) or chk.child("virtualhost")
    if host is not None and host.args:
        fields.append(f"host: {_q(host.args[0])}")
    elif vhost is not None:
        fields.append(f"host: {_q(vhost)}")
    for sub in (url.children or []) if url else []:
        if sub.keyword not in ("path", "status_code", "virtualhost"):
            why = (
                "l4lb matches the status, not a digest of the body"
                if sub.keyword == "digest"
                else "not checked by l4lb"
            )
            out.note(indent, sub, why)
    for more in urls[1:]:
        more_path = more.child("path")
        shown = more_path.args[0] if more_path and more_path.args else "/"
        out.note(
            indent,
            more,
            f"another url ({shown}): l4lb checks one url a backend (keepalived: all must pass)",
        )


def _misc_check(
    out: _Out, chk: Node, delay: float, indent: int, fields: list[str], handled: set[str]
) -> bool:
    """MISC_CHECK as an exec check; False (with a note) when it names no command."""
    handled |= {"misc_path", "misc_timeout"}
    misc = chk.child("misc_path")
    if misc is None or not misc.args:
        out.note(indent, chk, "a MISC_CHECK without misc_path")
        return False
    argv = shlex.split(" ".join(misc.args))
    fields.append("command: [" + ", ".join(_q(a) for a in argv) + "]")
    # keepalived: misc_timeout, else delay_loop (not connect_timeout)
    fields[1] = f"timeout: {_seconds(chk.child('misc_timeout'), delay):g}s"
    for option, why in (
        ("misc_dynamic", "l4lb takes the exit status as up or down, not as a weight"),
        ("user", "l4lb runs the command as its own user"),
    ):
        node = chk.child(option)
        handled.add(option)
        if node is not None:
            out.note(indent, node, why)
    return True


def _statuses(out: _Out, indent: int, url: Node | None) -> str:
    """`status_code 200-299 400-499 503` as l4lb's list; keepalived's default is 200-299."""
    node = url.child("status_code") if url else None
    if node is None or not node.args:
        return '"200-299"'
    items: list[str] = []
    for arg in node.args:
        m = _STATUS_RE.match(arg)
        if m is None or not 100 <= int(m.group(1)) <= int(m.group(2) or m.group(1)) <= 599:
            out.note(indent, node, f"{arg!r} is not a status or a range of them: left out")
            continue
        items.append(f'"{arg}"' if m.group(2) else arg)
    return ", ".join(items) or '"200-299"'


def _quorum(out: _Out, vs: Node, weights: list[int]) -> None:
    """keepalived's quorum is a sum of live weights, l4lb's a count of live backends: the
    count that guarantees the weight whichever backends are up (the lightest ones first)."""
    opt = vs.child("quorum")
    if opt is None or not opt.args or not opt.args[0].isdigit():
        return
    needed = int(opt.args[0])
    total = 0
    count = 0
    for w in sorted(weights):
        if total >= needed:
            break
        total += w
        count += 1
    if total < needed or not weights:
        out.add(2, f"quorum: {max(1, len(weights))}")
        out.note(2, opt, f"the weights sum to {sum(weights)}, below the quorum: every backend")
        return
    count = max(1, count)
    if set(weights) == {1} or count == needed:
        out.add(2, f"quorum: {count}")
        return
    out.add(2, f"quorum: {count}")
    shown = ", ".join(map(str, weights))
    out.change(
        2,
        opt,
        f"keepalived counts weights ({shown}): any {count} backends up carry at least"
        f" {needed}; keepalived may serve with fewer",
    )


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _addr_port(args: list[str]) -> tuple[str, int | None]:
    address = str(ipaddress.ip_address(args[0]))
    port = int(args[1]) if len(args) > 1 and args[1].isdigit() else None
    return address, port


def convert(
    path: str | Path,
    fwmark_ports: dict[int, list[int]] | None = None,
    kernel_marks: str | None = None,
) -> tuple[str, int]:
    """The l4lb YAML for the keepalived.conf at `path`, and how many options were not carried.
    With `kernel_marks` (host:port of the REDIRECT target), fwmark services become groups chosen
    by the kernel's mark, so the firewall rules written for LVS drive l4lb unchanged."""
    fwmark_ports = fwmark_ports or {}
    nodes = parse(path)
    groups = {n.args[0]: n for n in nodes if n.keyword == "virtual_server_group" and n.args}
    out = _Out(kernel=kernel_marks is not None)
    out.add(0, f"# Converted from {path} by l4lb import-keepalived. Check: l4lb check -c FILE")
    if kernel_marks is not None:
        out.add(0, f"kernel_marks: {{listen: {_q(kernel_marks)}}}   # the REDIRECT target")
    out.add(0, "groups:")
    converted = 0
    for n in nodes:
        if n.keyword in (
            "global_defs",
            "virtual_server_group",
            "vrrp_instance",
            "vrrp_sync_group",
            "vrrp_script",
        ):
            if n.keyword.startswith("vrrp"):
                out.note(
                    1, n, "VRRP is keepalived's own job; run keepalived beside l4lb for the address"
                )
            continue
        if n.keyword != "virtual_server":
            out.note(1, n, "not a virtual server")
            continue
        converted += _virtual_server(out, n, groups, fwmark_ports)
    if not converted:
        if not any(n.keyword == "virtual_server" for n in nodes):
            raise KeepalivedError(f"{path}: no virtual_server to convert")
        out.add(1, "{}   # no virtual server could be carried over (see above): add a group")
    return "\n".join(out.lines) + "\n", out.notes


def _svc(p: int, udp: bool) -> str:
    """A service port as the ports list and the port maps write it."""
    return f'"{p}/udp"' if udp else str(p)


@dataclass
class Where:
    """A virtual server's name, addresses, ports, firewall marks, and the notes that belong
    under its name."""

    name: str
    listen: list[str]
    ports: list[int]
    marks: list[int]
    later: list[tuple[Node, str]]


def _where(out: _Out, vs: Node, groups: dict[str, Node]) -> Where | None:
    """A virtual server's name, addresses, ports, firewall marks, and the notes that belong
    under its name; None (noted) when it names no address."""
    listen: list[str] = []
    ports: list[int] = []
    marks: list[int] = []
    later: list[tuple[Node, str]] = []  # notes that belong under the group's name
    if vs.args[:1] == ["fwmark"] and len(vs.args) > 1:
        marks.append(int(vs.args[1]))
        name = f"fwmark{vs.args[1]}"
    elif vs.args[:1] == ["group"] and len(vs.args) > 1 and vs.args[1] in groups:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", vs.args[1])
        for entry in groups[vs.args[1]].children or []:
            if entry.keyword == "fwmark" and entry.args:
                marks.append(int(entry.args[0]))
                continue
            words = [entry.keyword, *entry.args]
            host, _, last = words[0].partition("-")
            if last:
                later.append((entry, "an address range; l4lb listens on the first address only"))
            try:
                address, port = _addr_port([host, *words[1:]])
            except ValueError:
                later.append((entry, "not an address and port"))
                continue
            if address not in listen:
                listen.append(address)
            if port is not None and port not in ports:
                ports.append(port)
    else:
        try:
            address, port = _addr_port(vs.args)
        except (ValueError, IndexError):
            out.note(1, vs, "not an address and port")
            return None
        listen.append(address)
        name = f"vs_{address.replace(':', '_').replace('.', '_')}_{port}"
        if port is not None:
            ports.append(port)
    return Where(name, listen, ports, marks, later)


def _marks(
    out: _Out, marks: list[int], listen: list[str], ports: list[int], udp: bool, known: bool
) -> None:
    """The group's firewall marks (`known`: the ports of each are given), and what l4lb
    cannot take of them or of its addresses, said as comments."""
    if len(listen) > 1 and len(ports) > 1:
        out.add(2, "# l4lb listens on every address below with every port (keepalived: the pairs)")
    if marks and out.kernel and not listen and not udp:
        out.add(2, f"kernel_mark: {marks[0]}   # chosen by the firewall mark, as LVS does")
        for extra_mark in marks[1:]:
            out.add(2, f"# changed: fwmark {extra_mark}: one mark a group in l4lb; set {marks[0]}")
            out.notes += 1
    if marks:
        out.add(2, f"mark: {marks[0]}")
        if not known:
            marked = ", ".join(map(str, marks))
            out.add(2, f"# changed: fwmark {marked}: the marked ports come from your firewall;")
            out.add(
                2, "# give them with --fwmark-ports MARK=PORT,PORT (until then l4lb check refuses"
            )
            out.add(2, "# the group: it would listen on no port)")
            out.notes += 1


def _family(vs: Node, listen: list[str]) -> int | None:
    """The virtual server's address family as keepalived knows it when it reads the
    granularity: from its address; a fwmark's from `ip_family`, else unknown (None)."""
    if listen:
        return 6 if ":" in listen[0] else 4
    fam = vs.child("ip_family")
    if fam is not None and fam.args:
        return {"inet": 4, "inet6": 6}.get(fam.args[0])
    return None


def _granularity(out: _Out, node: Node, family: int | None) -> str | None:
    """`persistence_granularity` as keepalived reads it (check_parser.c): on an IPv4 service
    a netmask as inet_aton takes it (a bare number is an address: 24 is 0.0.0.24), on an IPv6
    one a prefix length 1-128, and where the family is unknown, IPv4 if the value has a dot.
    What keepalived refuses, it ignores (the default, /32 or /128). None: that default."""
    g = node.args[0]
    if family is None:
        family = 4 if "." in g else 6
    if family == 6:
        if g.isdigit() and 1 <= int(g) <= 128:
            return f"ipv6_prefix: {int(g)}"
        out.change(2, node, "keepalived refuses it on an IPv6 service: each client alone (/128)")
        return None
    try:
        mask = int.from_bytes(socket.inet_aton(g), "big")
    except OSError:
        out.change(2, node, "keepalived refuses it on an IPv4 service: each client alone (/32)")
        return None
    dotted = socket.inet_ntoa(mask.to_bytes(4, "big"))
    inverted = ~mask & 0xFFFFFFFF
    if g.count(".") != 3 or inverted & (inverted + 1):
        out.change(
            2,
            node,
            f"keepalived reads it as the netmask {dotted} (kept: LVS masks with it as it is);"
            " a /24 is 255.255.255.0",
        )
    return f'netmask: "{dotted}"'


def _schedule(out: _Out, vs: Node, listen: list[str]) -> None:
    """The scheduler and persistence of a virtual server."""
    algo = vs.child("lb_algo") or vs.child("lvs_sched")
    sched = "wlc"
    if algo is not None and algo.args:
        sched = SCHEDULERS.get(algo.args[0], "")
        if not sched:
            out.note(2, algo, "no such scheduler in l4lb; wlc instead")
            sched = "wlc"
    out.add(2, f"scheduler: {sched}")
    pto, gran = vs.child("persistence_timeout"), vs.child("persistence_granularity")
    if pto is None and gran is None:
        out.add(2, "persistence: {timeout: 0}   # keepalived: none without persistence_timeout")
    else:
        timeout = _seconds(pto, 360.0)
        persist = [f"timeout: {timeout:g}s"]
        mask = _granularity(out, gran, _family(vs, listen)) if gran and gran.args else None
        if pto is None and gran is not None and gran.args and mask is None:
            out.add(2, "persistence: {timeout: 0}   # keepalived: none, its granularity refused")
            return
        if mask is not None:
            persist.append(mask)
        out.add(2, "persistence: {" + ", ".join(persist) + "}")


_WAY_BACK = (
    "this host needs `ip rule add iif <the real servers' side> lookup 100` and"
    " `ip route add local 0.0.0.0/0 dev lo table 100` (docs/deployment.md)"
)


def _forwarding(out: _Out, vs: Node) -> None:
    """`lb_kind` (`lvs_method`): NAT and DR keep the client's address on the real servers, so
    the group dials them from it (`source: client`); TUN is said only."""
    for kind in ("lb_kind", "lvs_method"):
        opt = vs.child(kind)
        if opt is None or not opt.args:
            continue
        how = opt.args[0].upper()
        if how == "NAT":
            out.add(2, "source: client   # lb_kind NAT: the real servers see the client's address")
            out.change(
                2,
                opt,
                "l4lb dials the real servers from each client's address (source: client); their"
                " answers must come back through this host, as NAT's already do, and " + _WAY_BACK,
            )
        elif how == "DR":
            out.add(2, "source: client   # lb_kind DR: the real servers see the client's address")
            out.change(
                2,
                opt,
                "l4lb dials the real servers from each client's address (source: client); with"
                " DR they answered clients directly: route their answers through this host"
                " (their default gateway) instead, and " + _WAY_BACK,
            )
        else:
            out.change(
                2,
                opt,
                f"l4lb is a full proxy and dials the real servers itself (no {how} tunnel); they"
                " see l4lb's address: `send_proxy: v2` passes the client's to those that read"
                " the PROXY protocol",
            )


def _sorry(out: _Out, vs: Node, ports: list[int], udp: bool) -> None:
    sorry = vs.child("sorry_server")
    if sorry is not None and len(sorry.args) >= 1:
        address, sport = _addr_port(sorry.args)
        maps = (
            (", ports: {" + ", ".join(f"{_svc(p, udp)}: {sport}" for p in ports) + "}")
            if sport and any(p != sport for p in ports)
            else ""
        )
        out.add(2, f"sorry_server: {{address: {_q(address)}{maps}}}")


def _real_servers(out: _Out, vs: Node, listen: list[str], ports: list[int], udp: bool) -> bool:
    """The backends; False when there is none."""
    delay = _seconds(vs.child("delay_loop"), 60.0)
    vh = vs.child("virtualhost")
    vhost = vh.args[0] if vh is not None and vh.args else None  # the checks' default Host
    names: set[str] = set()
    for rs in vs.all("real_server"):
        try:
            address, rs_port = _addr_port(rs.args)
        except (ValueError, IndexError):
            out.note(3, rs, "not an address and port")
            continue
        if _is_own(rs, listen, ports):
            out.note(
                3,
                rs,
                "the virtual server's own address and port: a proxy would connect to itself"
                " (give l4lb the real server's own address)",
            )
            continue
        base = f"rs_{address.replace(':', '_').replace('.', '_')}" + (
            f"_{rs_port}" if rs_port else ""
        )
        name = base
        while name in names:
            name += "_"
        names.add(name)
        out.add(3, f"- name: {name}")
        out.add(4, f"address: {_q(address)}")
        weight = rs.child("weight")
        if weight is not None and weight.args:
            out.add(4, f"weight: {min(int(weight.args[0]), 65535)}")
        if rs_port and any(p != rs_port for p in ports):
            out.add(4, "ports: {" + ", ".join(f"{_svc(p, udp)}: {rs_port}" for p in ports) + "}")
        if rs.child("inhibit_on_failure") is not None or vs.child("inhibit_on_failure") is not None:
            out.add(4, "inhibit_on_failure: true")
        _check(out, rs, rs_port, delay, 4, vhost)
        for child in rs.children or []:
            if child.keyword not in _CHECKS | _OTHER_CHECKS and child.keyword not in (
                "weight",
                "inhibit_on_failure",
            ):
                out.note(4, child, "no l4lb equivalent")
    return bool(names)


def _virtual_server(
    out: _Out, vs: Node, groups: dict[str, Node], fwmark_ports: dict[int, list[int]]
) -> int:
    where = _where(out, vs, groups)
    if where is None:
        return 0
    name, listen, ports, marks, later = (
        where.name, where.listen, where.ports, where.marks, where.later
    )  # fmt: skip
    protocol = vs.child("protocol")
    proto = protocol.args[0].upper() if protocol is not None and protocol.args else "TCP"
    if proto not in ("TCP", "UDP"):
        out.note(
            1, vs, f"protocol {protocol.args[0] if protocol else proto}: l4lb balances TCP and UDP"
        )
        return 0
    udp = proto == "UDP"
    for m in marks:
        if m in fwmark_ports:
            ports += [p for p in fwmark_ports[m] if p not in ports]
    if udp:
        name += "_udp"  # beside a TCP virtual server of the same address and port
    out.add(1, f"{name}:")
    for node, why in later:
        out.note(2, node, why)
    _marks(out, marks, listen, ports, udp, all(m in fwmark_ports for m in marks))
    if listen:
        out.add(2, "listen: [" + ", ".join(_q(a) for a in listen) + "]")
    out.add(2, "ports: [" + ", ".join(_svc(p, udp) for p in ports) + "]")  # ([]: refused)
    _schedule(out, vs, listen)
    weights = [_weight(rs) for rs in vs.all("real_server") if not _is_own(rs, listen, ports)]
    _quorum(out, vs, weights)
    hyst = vs.child("hysteresis")
    if hyst is not None and hyst.args and hyst.args[0].isdigit():
        out.add(2, f"hysteresis: {int(hyst.args[0])}")
    _forwarding(out, vs)
    _sorry(out, vs, ports, udp)
    for child in vs.children or []:
        if child.keyword not in _VS_DONE:
            out.note(2, child, "no l4lb equivalent")
    out.add(2, "backends:")
    if not _real_servers(out, vs, listen, ports, udp):
        out.add(3, "[]   # no real_server: l4lb check will refuse this group")
    return 1
