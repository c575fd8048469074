"""`l4lb ctl`: the admin API from a terminal, as tables or `--json`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from typing import Any

from ..config import ConfigError, load_admin_section, load_config
from ..config.files import read_text
from ..config.validator import NAMED_LIMIT
from ..core.spec import AdminSpec


class CtlError(Exception):
    pass


def add_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="talk to a running l4lb's admin API")
    ctl.add_argument(
        "-c", "--config", help="take the admin address and token file from this config"
    )
    ctl.add_argument(
        "--admin",
        metavar="URL|[HOST:]PORT",
        help="the admin API: a URL, or HOST:PORT or PORT as `l4lb run --admin` takes it"
        " (default http://127.0.0.1:9090)",
    )
    ctl.add_argument(
        "--token-file", metavar="FILE", help="a file holding the bearer token that changes need"
    )
    ctl.add_argument("--json", action="store_true", help="print the API's JSON answer")
    what = ctl.add_subparsers(
        dest="what", required=True, metavar="{status,affinity,backend,reload,upgrade,handover}"
    )
    what.add_parser("status", help="groups and backends, with their addresses and states")
    aff = what.add_parser("affinity", help="list, flush or show affinity entries")
    aff.add_argument(
        "action",
        choices=["list", "flush", "show"],
        help="list entries (sorted by group and client), flush them, or show one client's",
    )
    aff.add_argument("address", nargs="?", help="show: a client address (or a prefix)")
    aff.add_argument("--group", help="only this group's entries")
    aff.add_argument(
        "--client", help="an address (its network's entry) or a prefix such as 10.0.0.0/8"
    )
    aff.add_argument("--backend", help="only the entries pinned to this backend")
    aff.add_argument("--limit", type=int, default=1000, help="list: at most this many (1000)")
    be = what.add_parser("backend", help="drain, enable, disable a backend or set its weight")
    be.add_argument(
        "action",
        choices=["drain", "enable", "disable", "weight"],
        help="drain: no new clients, pins kept; disable: as down; enable: up again",
    )
    be.add_argument("group", help="the backend's group")
    be.add_argument("name", help="the backend's name")
    be.add_argument("weight", nargs="?", type=int, help="weight: the new weight (0-65535)")
    what.add_parser("reload", help="reload the configuration file")
    what.add_parser(
        "upgrade",
        help="hand everything to the l4lb installed now (new code, the configuration file as"
        " it is now): no connection refused or cut; exits 1 with why when it did not happen",
    )
    what.add_parser(
        "handover",
        help="an HA pair's active host: move every open connection, flow and the addresses to"
        " the peer (TCP_REPAIR; keepalived moves the addresses); exits 1 with why, all still"
        " served here, when it did not happen",
    )


def _call(
    base: str,
    method: str,
    path: str,
    token: str | None,
    body: dict[str, Any] | None = None,
    timeout: float = 10,
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    import urllib.error  # here, not at the top: `l4lb run` builds this parser too, and
    import urllib.request  # urllib.request (http.client, email) is 2.8 MiB it would not use

    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise CtlError(f"{method} {path}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"cannot reach the admin API at {base}: {reason}") from None


def _admin_of(path: str) -> AdminSpec | None:
    """The admin section of a config file. A file with errors elsewhere (being edited, say) still
    lends its admin section, so that the running instance can be inspected and reloaded."""
    try:
        return load_config(path).admin
    except ConfigError as exc:
        print(f"warning: {path} has errors (l4lb check -c {path}): {exc.lines[0]}", file=sys.stderr)
    try:
        return load_admin_section(path)
    except ConfigError:
        return None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cols = [header, *[[("-" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cols
    )


def admin_url(text: str) -> str:
    """`--admin` as a base URL: a URL as it is; PORT, HOST:PORT or [V6]:PORT on http."""
    if "://" in text:
        return text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CtlError(f"--admin {text}: expected a URL, HOST:PORT or PORT")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    try:
        base = admin_url(args.admin) if args.admin else None
    except CtlError as exc:
        print(exc, file=sys.stderr)
        return 2
    token_file = args.token_file
    if args.config:
        admin = _admin_of(args.config)
        if admin is None:
            print(f"{args.config}: has no usable admin section", file=sys.stderr)
            return 1
        base = base or admin.url
        token_file = token_file or admin.token_file
    base = base or "http://127.0.0.1:9090"
    token = None
    if token_file:
        try:
            token = read_text(token_file, NAMED_LIMIT).strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            print(f"cannot read the token file {token_file}: {why}", file=sys.stderr)
            return 1
    try:
        answer, text = _do(args, base, token)
    except CtlError as exc:
        print(f"l4lb ctl: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(answer, indent=2) if args.json else text)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's own flush is quiet too
    return 0


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f}s ago"


def _show(answer: dict[str, Any], address: str) -> str:
    """Per group: the key, the backend, connections, expiry, the pin's age, the last re-pin."""
    if not answer["entries"]:
        return f"{address}: no affinity entry in any group"
    out = []
    for e in answer["entries"]:
        open_, flows = e["connections"], e.get("flows", 0)
        parts = [plural(open_, "connection")] if open_ else []
        parts += [plural(flows, "UDP flow")] if flows else []
        state = (
            f"{' and '.join(parts)} open" if parts else f"idle, expires in {e['expires_in']:.0f}s"
        )
        line = f"{e['group']}: {e['client']} -> {e['backend'] or '(unpinned)'}, {state}"
        if e.get("pinned_for") is not None:
            line += f", pinned {_ago(e['pinned_for'])}"
        repin = e.get("last_repin")
        if repin:
            line += (
                f"; last re-pin {_ago(repin['seconds_ago'])} from {repin['from']}"
                f" ({repin['reason']})"
            )
        out.append(line)
    return "\n".join(out)


def _status(base: str, token: str | None) -> tuple[Any, str]:
    groups = _call(base, "GET", "/api/v1/groups", token)
    backends = _call(base, "GET", "/api/v1/backends", token)
    g_rows = [
        [
            g["name"],
            g["mark"],
            ",".join([*map(str, g["ports"]), *(f"{p}/udp" for p in g.get("udp_ports", []))]),
            g["scheduler"],
            g["persistence"]["entries"],
            g["stats"]["accepted"],
            g["stats"]["repins"],
            "serving" if g["sorry_server_serving"] else "standby",
        ]
        for g in groups["groups"]
    ]
    b_rows = [
        [
            b["group"],
            b["name"]
            + (" (backup)" if b.get("backup") else "")
            + (f" [server ID {b['server_id']}]" if b.get("server_id") else ""),
            ", ".join(f"{a} ({sp})" for sp, a in b["addresses"].items()) or b["address"],
            b["state"],
            b["weight"],
            b["active"],
            b["connections"],
            (b["last_check"] or {}).get("detail"),
        ]
        for b in backends["backends"]
    ]
    text = _table(
        g_rows, ["GROUP", "MARK", "PORTS", "SCHED", "PINNED", "ACCEPTED", "REPINS", "SORRY"]
    )
    for g in groups["groups"]:
        if g.get("quic_lb"):
            text += "\n" + _quic_line(g)
    text += "\n\n" + _table(
        b_rows,
        ["GROUP", "BACKEND", "ADDRESS", "STATE", "WEIGHT", "OPEN", "CONNS", "LAST CHECK"],
    )
    text += "\n\n" + _process_line(groups)
    if isinstance(groups.get("ha"), dict):
        text += "\n" + _pair_lines(_call(base, "GET", "/api/v1/ha?peer=1", token))
    return {"groups": groups["groups"], "backends": backends["backends"]}, text


def _pair_lines(ha: dict[str, Any]) -> str:
    """An HA pair: this host's role, the peer's, what moved, the last hand-over."""
    import time

    since = time.strftime("%H:%M:%S", time.localtime(ha.get("since", 0)))
    peer = ha.get("peer_state") or {}
    peer_role = peer.get("role") or f"unreachable ({peer.get('error', '?')})"
    c = ha.get("connections", {})
    lines = [
        f"ha: this host {ha.get('role')} since {since} ({', '.join(ha.get('addresses', []))});"
        f" peer {ha.get('peer')} {peer_role}",
        f"ha: connections moved {c.get('moved', 0)}, taken {c.get('taken', 0)}, kept on a"
        f" failed hand-over {c.get('kept', 0)}, lost {c.get('lost', 0)}; failovers seen"
        f" {ha.get('failovers', 0)}",
    ]
    last = ha.get("last_handover")
    if isinstance(last, dict):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("at", 0)))
        lines.append(
            f"ha: last hand-over {when}: {last.get('direction')} {last.get('connections')}"
            f" connections, {last.get('flows', 0)} flows, in {last.get('seconds')} s"
        )
    return "\n".join(lines)


def _process_line(groups: dict[str, Any]) -> str:
    """When this process started, and the upgrade it came from, if one."""
    import time

    started = groups.get("started_at")
    if not isinstance(started, int | float):
        return f"up {groups.get('uptime', 0):.0f}s"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    line = f"process started {when} (up {time.time() - started:.0f}s)"
    last = groups.get("last_upgrade")
    if isinstance(last, dict):
        line += f"; came by an upgrade: {last.get('line')}"
    return line


def _quic_line(g: dict[str, Any]) -> str:
    """A quic_lb group's line: its configuration and how its new flows were routed."""
    q, udp = g["quic_lb"], g.get("udp") or {}
    routes = ", ".join(f"{k} {v}" for k, v in (udp.get("quic") or {}).items())
    return (
        f"{g['name']}: quic_lb config {q['config_id']}, server IDs of {q['server_id_length']}"
        f" octets, {'encrypted' if q['encrypted'] else 'plaintext'}; new flows by {routes};"
        f" {plural(udp.get('migrations', 0), 'migration')}"
    )


def _affinity(args: argparse.Namespace, base: str, token: str | None) -> tuple[Any, str]:
    query = {k: v for k in ("group", "client", "backend") if (v := getattr(args, k)) is not None}
    if args.action == "show":
        if not args.address:
            raise CtlError("affinity show ADDRESS: the client address is missing")
        query["client"] = args.address
        answer = _call(base, "GET", "/api/v1/affinity?" + urllib.parse.urlencode(query), token)
        if not answer["entries"]:  # (a script can tell: exit 1)
            raise CtlError(f"{args.address}: no affinity entry in any group")
        return answer, _show(answer, args.address)
    if args.address:
        raise CtlError(f"affinity {args.action} takes --client, not {args.address!r}")
    if args.action == "list":
        query["limit"] = str(args.limit)
        answer = _call(base, "GET", "/api/v1/affinity?" + urllib.parse.urlencode(query), token)
        rows = [
            [
                e["group"],
                e["client"],
                e["backend"],
                e["connections"],
                e.get("flows", 0),
                "open" if e["expires_in"] is None else f"{e['expires_in']:.0f}s",
            ]
            for e in answer["entries"]
        ]
        text = _table(rows, ["GROUP", "CLIENT", "BACKEND", "CONNS", "FLOWS", "EXPIRES IN"])
        if answer["total"] > len(rows):
            text += f"\n({len(rows)} of {answer['total']} shown; see --limit)"
        return answer, text
    answer = _call(base, "DELETE", "/api/v1/affinity?" + urllib.parse.urlencode(query), token)
    return answer, f"flushed {plural(answer['deleted'], 'entry', 'entries')}"


def _backend(args: argparse.Namespace, base: str, token: str | None) -> tuple[Any, str]:
    path = f"/api/v1/backends/{urllib.parse.quote(args.group)}/{urllib.parse.quote(args.name)}"
    if args.action == "weight":
        if args.weight is None:
            raise CtlError("backend weight GROUP NAME WEIGHT: the weight is missing")
        body: dict[str, Any] = {"weight": args.weight}
    else:
        body = {"state": {"drain": "drain", "enable": "up", "disable": "disabled"}[args.action]}
    b = _call(base, "POST", path, token, body)
    return b, f"{b['group']}/{b['name']}: state {b['state']}, weight {b['weight']}"


def _do(args: argparse.Namespace, base: str, token: str | None) -> tuple[Any, str]:
    if args.what == "status":
        return _status(base, token)
    if args.what == "affinity":
        return _affinity(args, base, token)
    if args.what == "backend":
        return _backend(args, base, token)
    if args.what == "upgrade":
        answer = _call(base, "POST", "/api/v1/upgrade", token, {}, timeout=60)
        return answer, "upgraded: " + answer["upgrade"]
    if args.what == "handover":
        answer = _call(base, "POST", "/api/v1/handover", token, {}, timeout=120)
        return answer, answer["handover"]
    answer = _call(base, "POST", "/api/v1/reload", token, {})
    return answer, "reloaded: " + ("; ".join(answer["changes"]) or "no changes")
