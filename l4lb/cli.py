"""The command line: `l4lb run`, `l4lb check`, `l4lb version`. Exit codes: 0 ok, 1 bad config
or failed start, 2 bad usage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from .balancer import Server
from .config import ConfigError, load_config, load_config_text
from .core.spec import SCHEDULERS, Config
from .runtime import sdnotify
from .runtime.channel import Channel
from .runtime.errors import AsTree, ReloadError, StartupError, UpgradeError
from .runtime.heap import settle_heap
from .runtime.successor import SuccessorSocket, connect_to
from .version import __version__

log = logging.getLogger("l4lb")


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop when it can be imported, the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the standard asyncio loop (slower)")
        return asyncio.run(main)
    return uvloop.run(main)


class Balancer(Protocol):
    """A single process (`Server`) or a supervisor of workers (`Supervisor`), run alike."""

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    async def reload_from_file(self) -> list[str]: ...
    async def upgrade(self, successor: Channel | None = None, /) -> str: ...
    def reopen_logs(self) -> None: ...


async def _serve(
    config: Config,
    demo: bool,
    log_level: str,
    takeover: int | None = None,
    handover_socket: str | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0
    log.info("%s", _version())  # which build runs, compiled or pure Python (l4lb/native.py)
    # Started by an upgrade (or asking for one): everything comes from the old process
    channel = Channel(socket.socket(fileno=takeover)) if takeover is not None else None
    balancer = _balancer(config, log_level, channel)

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("received %s: shutting down", sig.name)
            stop.set()
        else:
            log.warning("received %s again: exiting now", sig.name)
            kill = getattr(balancer, "kill", None)
            if kill is not None:
                kill()
            raise SystemExit(1)

    reloads: set[asyncio.Task[object]] = set()

    def on_hangup() -> None:
        log.info("received SIGHUP: reloading %s", config.source)
        task: asyncio.Task[object] = loop.create_task(_reload(balancer))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_upgrade() -> None:
        log.info("received SIGUSR2: upgrading to the l4lb installed now")
        task: asyncio.Task[object] = loop.create_task(_upgrade(balancer))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    loop.add_signal_handler(signal.SIGUSR2, on_upgrade)
    loop.add_signal_handler(signal.SIGUSR1, balancer.reopen_logs)  # logrotate
    demo_servers: list[asyncio.AbstractServer] = []
    doorway: SuccessorSocket | None = None
    try:
        if demo:
            from .demo import print_hints, start_demo_backends

            demo_servers = await start_demo_backends(config)
        try:
            await balancer.start()
        except AsTree:  # (nothing served, bound or saved yet: the same channel, as a tree)
            balancer = _balancer(config, log_level, channel, tree=True)
            await balancer.start()
        settle_heap()
        if handover_socket is not None:  # (a successor that asks takes everything)
            doorway = _doorway(handover_socket, balancer)
        if demo:
            print_hints(config)
        sdnotify.ready(_status(config))
        await stop.wait()
    except StartupError as exc:
        log.error("%s", exc)
        if channel is not None:  # the old process says why, in its log and its answer
            channel.send({"t": "error", "why": str(exc)})
        return 1
    finally:
        if doorway is not None:
            doorway.close()
        sdnotify.stopping()
        await balancer.shutdown()
        for srv in demo_servers:
            srv.close()
    return 0


def _balancer(
    config: Config, log_level: str, takeover: Channel | None, tree: bool = False
) -> Balancer:
    """A single process, or a supervisor of workers (an upgrade's: with its `takeover`; `tree`:
    of one worker, taking over from a tree)."""
    if config.workers > 1 or tree:
        from .workers.supervisor import Supervisor

        return Supervisor(config, log_level, takeover=takeover)
    return Server(config, takeover=takeover)


def _doorway(path: str, balancer: Balancer) -> SuccessorSocket | None:
    """`--handover-socket`: listening, or None, said (not fatal: what this process serves, it
    serves on; SIGUSR2 upgrades still work)."""
    doorway = SuccessorSocket(path, balancer.upgrade)
    try:
        doorway.open()
    except OSError as exc:
        log.error(
            "cannot listen on the handover socket %s: %s; serving without it (SIGUSR2 upgrades"
            " still work)",
            path,
            exc.strerror or exc,
        )
        return None
    log.info("a new l4lb may take over on %s (l4lb run --take-over)", path)
    return doorway


async def _upgrade(balancer: Balancer) -> object:
    """SIGUSR2: the upgrade (its outcome is logged by the runtime, a line either way)."""
    sdnotify.reloading()
    try:
        return await balancer.upgrade()
    except UpgradeError:
        sdnotify.ready("upgrade failed; serving on (see the log)")
        return None


async def _reload(balancer: Balancer) -> object:
    sdnotify.reloading()
    try:
        changes = await balancer.reload_from_file()
    except ReloadError as exc:  # logged by the server, line by line
        if exc.partial:
            sdnotify.ready(f"reload not applied by every worker ({exc.lines[0]})")
        else:
            sdnotify.ready(f"reload refused ({exc.lines[0]}); serving the previous configuration")
        return None
    n = len(changes)
    sdnotify.ready(f"reloaded: {n} change{'' if n == 1 else 's'}" if n else "reloaded: no changes")
    return changes


def _flags_config(args: argparse.Namespace) -> str | None:
    """The YAML for -l/-b, None when the run has a file instead, "" after a bad flag."""
    flags = [
        args.listen,
        args.backend,
        args.persistence,
        args.scheduler,
        args.admin,
        args.admin_token_file,
    ]
    if not any(flags):
        if args.print_config:
            print("l4lb run --print-config: prints what -l/-b amount to", file=sys.stderr)
            return ""
        return None
    if args.config:
        print("l4lb run: -c FILE or the -l/-b flags, not both", file=sys.stderr)
        return ""
    from .config.quick import FlagError, to_yaml

    token_file = args.admin_token_file
    try:
        if token_file is not None:
            token_file = _token_file(token_file)
        return to_yaml(
            args.listen, args.backend, args.persistence, args.scheduler, args.admin, token_file
        )
    except FlagError as exc:
        print(f"l4lb run: {exc}", file=sys.stderr)
        return ""


def _token_file(path: str) -> str:
    """--admin-token-file's absolute path; a file that does not exist yet is made, with a new
    token (readable by its owner only), and said once: local dev needs no openssl step."""
    from .config.quick import FlagError

    target = Path(path).expanduser().resolve()
    if not target.exists():
        import secrets

        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        except OSError as exc:
            raise FlagError(f"--admin-token-file {path}: {exc.strerror or exc}") from None
        print(f"l4lb: wrote a new admin token to {target}", file=sys.stderr)
    return str(target)


def _status(config: Config) -> str:
    """What `systemctl status` says of a started balancer."""
    ports = sum(len(g.ports) for g in config.groups)
    groups = len(config.groups)
    who = f"{config.workers} workers" if config.workers > 1 else "serving"
    g = f"{groups} group{'' if groups == 1 else 's'}"
    return f"{who}: {g}, {ports} port{'' if ports == 1 else 's'}"


def _healthcheck(path: str) -> int:
    """For container HEALTHCHECKs: 0 when /healthz answers, or when there is no admin API to ask."""
    import urllib.request

    from .config import load_admin_section

    try:
        admin = load_admin_section(path)
    except ConfigError as exc:
        print(exc.lines[0], file=sys.stderr)
        return 1
    if admin is None:
        return 0
    try:
        with urllib.request.urlopen(admin.url + "/healthz", timeout=3) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"{admin.url}/healthz: {exc}", file=sys.stderr)
        return 1


def _import_keepalived(args: argparse.Namespace) -> int:
    from .config.keepalived import KeepalivedError, convert

    marks: dict[int, list[int]] = {}
    for spec in args.fwmark_ports:
        mark, _, ports = spec.partition("=")
        try:
            marks[int(mark)] = [int(p) for p in ports.split(",") if p]
        except ValueError:
            print(f"--fwmark-ports {spec}: expected MARK=PORT,PORT", file=sys.stderr)
            return 2
    try:
        text, notes = convert(args.file, marks, args.kernel_marks)
    except KeepalivedError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if notes:  # (counted from the comments themselves, so that the two always agree)
        dropped, changed = text.count("# not carried over ("), text.count("# changed")
        said = [f"{dropped} not carried over"] if dropped else []
        said += [f"{changed} carried over but changed"] if changed else []
        print(
            f"{' and '.join(said)}: see the comments that say so",
            file=sys.stderr,
        )
    return 0


def _raise_nofile() -> None:
    """Take the hard descriptor limit as the soft one (as HAProxy does): a balancer holds two
    descriptors per connection, and the usual soft limit of 1024 is 500 connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            return
        log.debug("descriptor limit raised from %d to %d", soft, want)


def _setup_logging(level: str, who: str = "") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
    )


def _worker(log_level: str) -> int:
    from .workers.worker import environment, serve

    try:
        env = environment()
    except (KeyError, ValueError):
        print("l4lb worker is started by l4lb run (workers: N), not by hand", file=sys.stderr)
        return 2
    _setup_logging(log_level, f"[worker {env.get('index')}] ")
    return _run_loop(serve(env))


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    run = sub.add_parser(
        "run",
        help="run the balancer",
        description="Run the balancer on a configuration file (-c), or on flags alone: "
        "l4lb run -l 8080 -l 8443 -b 127.0.0.1:9001,9441 -b 127.0.0.1:9002,9442",
    )
    run.add_argument("-c", "--config", help="the YAML configuration file")
    dev = run.add_argument_group("without a file (one group, `local`)")
    dev.add_argument(
        "-l",
        dest="listen",
        action="append",
        default=[],
        metavar="[HOST:]PORT",
        help="a port to listen on (127.0.0.1 unless a host is given); repeat for more",
    )
    dev.add_argument(
        "-b",
        dest="backend",
        action="append",
        default=[],
        metavar="HOST:PORT[,PORT...]",
        help="a backend: one port per -l port in their order, or one port for all at the same"
        " offset; named b1, b2, ...",
    )
    dev.add_argument(
        "--persistence", metavar="TIMEOUT[/PREFIX]", help="e.g. 5m/24, or off (default: 6m, /32)"
    )
    dev.add_argument("--scheduler", choices=SCHEDULERS, help="default: wlc")
    dev.add_argument("--admin", metavar="[HOST:]PORT", help="the admin API and status page")
    dev.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="the token that changes need (ctl, the status page's buttons); a FILE that does"
        " not exist is made with a new token",
    )
    dev.add_argument(
        "--print-config", action="store_true", help="print the YAML the flags amount to, and exit"
    )
    # An upgrade starts the new process with these (runtime/handover.py): the hand-over's
    # socket, and the old process's standard error, which is this one's once it has spoken.
    run.add_argument("--takeover-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--takeover-stderr", type=int, help=argparse.SUPPRESS)
    run.add_argument(
        "--handover-socket",
        metavar="PATH",
        help="listen on this Unix socket for a new l4lb, one this process did not start (a new"
        " container's, through a shared volume), to take everything over: --take-over PATH",
    )
    run.add_argument(
        "--take-over",
        metavar="PATH",
        help="start by taking every listener, connection, flow and pin over from the l4lb"
        " whose --handover-socket is PATH; it exits once this one serves",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        help="also start demo HTTP/HTTPS servers for the loopback backends of the config",
    )
    return run


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = sub.add_parser("import-keepalived", help="convert a keepalived.conf's virtual servers")
    imp.add_argument("file", help="the keepalived.conf (its include files are followed)")
    imp.add_argument("-o", "--output", help="write here instead of to standard output")
    imp.add_argument(
        "--fwmark-ports",
        action="append",
        default=[],
        metavar="MARK=PORT,PORT",
        help="the ports a firewall mark covers (fwmark services name none), e.g. 1=80,443",
    )
    imp.add_argument(
        "--kernel-marks",
        metavar="HOST:PORT",
        help="make fwmark services groups chosen by the kernel's mark, on this REDIRECT target",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l4lb", description=__doc__)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe events to log on stderr (default: info)",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and build")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{run,check,version,ctl,healthcheck,import-keepalived,quic-lb}",  # (not worker)
    )
    run = _add_run(sub)
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", required=True, help="the YAML configuration file")
    sub.add_parser("version", help="print the version")
    sub.add_parser("worker")  # started by the supervisor of `workers: N`, with L4LB_WORKER set
    from .admin.ctl import add_parser as add_ctl

    add_ctl(sub)
    hc = sub.add_parser("healthcheck", help="exit 0 if the admin API of a running l4lb answers")
    hc.add_argument("-c", "--config", required=True, help="the YAML configuration file")
    _add_import(sub)
    from .admin.quickey import add_parser as add_quic_lb

    add_quic_lb(sub)
    for p in (run, check):
        p.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"]
        )
    return parser


def _load(args: argparse.Namespace, text: str | None) -> Config | int:
    """The configuration of `run` or `check` (from the file, or from the flags' YAML `text`),
    or the exit code after its errors are printed."""
    try:
        config = load_config(args.config) if not text else load_config_text(text, "<flags>")
    except ConfigError as exc:
        if text:
            from .config.quick import explain

            for line in exc.lines:
                print(f"l4lb run: {explain(line, text)}", file=sys.stderr)
            return 2
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    for line in config.warnings:
        print(line, file=sys.stderr)
    return config


def _check(path: str, config: Config) -> int:
    """`l4lb check`: the names looked up once, then one line of what the file holds."""
    from .config.names import names_in

    names = names_in(config)
    if names:
        from .runtime.resolver import lookup_now

        for answer in lookup_now(names).values():
            if isinstance(answer, str):  # l4lb would start, with these backends down
                print(f"{path}: warning: {answer}", file=sys.stderr)
    transparent = [g.name for g in config.groups if g.source == "client"]
    if transparent:
        from .dataplane.transparent import has_net_admin

        if not has_net_admin():
            print(
                f"{path}: warning: groups.{transparent[0]}.source: client needs CAP_NET_ADMIN"
                " (IP_TRANSPARENT), which this process lacks: run l4lb with it"
                " (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
                file=sys.stderr,
            )
    if config.ha is not None:
        _check_pair(path, config)
    n = sum(len(g.backends) for g in config.groups)
    extra = f", {config.workers} workers" if config.workers > 1 else ""
    if config.affinity_store is not None:
        from .dataplane.store import redact

        extra += f", pins shared through {redact(config.affinity_store.url)}"
    g = len(config.groups)
    groups = f"{g} group{'' if g == 1 else 's'}, {n} backend{'' if n == 1 else 's'}"
    print(f"{path}: ok ({groups}{extra})")
    return 0


def _check_pair(path: str, config: Config) -> None:
    """`ha`: what moving connections needs of this host (runtime/pair.py)."""
    import shutil

    from .dataplane.repair import may_repair

    if not may_repair():
        print(
            f"{path}: warning: ha: moving open connections (TCP_REPAIR) and the network lock"
            " need CAP_NET_ADMIN, which this process lacks: a hand-over will fail, pins still"
            " survive a failover (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
            file=sys.stderr,
        )
    if shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        print(
            f"{path}: warning: ha: nft (nftables) is not installed: a hand-over's network"
            " lock needs it",
            file=sys.stderr,
        )


def _version() -> str:
    from . import native

    return f"l4lb {__version__}, {native.describe()}"


class _Version(argparse.Action):
    """--version: the build is looked up only when asked (it imports the core)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(_version())
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(_version())
        return 0
    if args.command == "healthcheck":
        return _healthcheck(args.config)
    if args.command == "import-keepalived":
        return _import_keepalived(args)
    if args.command == "worker":
        return _worker(args.log_level)
    if args.command == "ctl":
        from .admin.ctl import run as run_ctl

        return run_ctl(args)
    if args.command == "quic-lb":
        from .admin.quickey import run as run_quic_lb

        return run_quic_lb(args)
    _setup_logging(args.log_level)
    text: str | None = None
    if args.command == "run":
        text = _flags_config(args)
        if text is None and not args.config:
            print("l4lb run: give -c FILE, or -l PORT and -b HOST:PORT", file=sys.stderr)
            return 2
        if text == "":  # a bad flag, said on stderr: nothing on stdout, whatever was asked
            return 2
    config = _load(args, text)
    if isinstance(config, int):
        return config
    if text and args.print_config:  # (checked first, as it would run)
        print(text, end="")
        return 0
    if args.command == "check":
        return _check(args.config, config)
    _raise_nofile()
    takeover = getattr(args, "takeover_fd", None)
    asked = getattr(args, "take_over", None)
    if asked is not None and takeover is None:  # (a process the old one did not start)
        try:
            takeover = connect_to(asked)
        except OSError as exc:
            print(f"l4lb: cannot take over from {asked}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if takeover is not None:
        os.set_inheritable(takeover, False)  # (this process's: never a child's)
    if takeover is not None and args.takeover_stderr is not None:
        # The configuration is good: from here on, this process's lines go where the old one's
        # go (until now they went to a file the old process reads if this one fails to start).
        os.dup2(args.takeover_stderr, 2)
        os.close(args.takeover_stderr)
    if takeover is not None:
        # What would load later loads now, before the old process freezes its connections for
        # the hand-over: the time it takes is not theirs.
        if config.admin is not None:
            from .admin import api  # noqa: F401
        if config.affinity_store is not None:
            from .dataplane import store  # noqa: F401
    handover_socket = getattr(args, "handover_socket", None)
    return _run_loop(_serve(config, args.demo, args.log_level, takeover, handover_socket))
