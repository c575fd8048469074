"""An HA pair in network namespaces of the test's own (tests/peers/test_pair.py):

    client (10.1.0.10, clients 10.100.N.1-2)       backends (10.2.0.11-13: HTTP 8000 names,
         |  front 10.1.0.0/24, VIP 10.1.0.100         echo 7000; redis-server 10.2.0.10)
    [ switch: two bridges ]  ------------------------------------|  back 10.2.0.0/24, VIP 10.2.0.100
         |                 |
    host1 (10.1.0.1 / 10.2.0.1)   host2 (10.1.0.2 / 10.2.0.2): each real keepalived and l4lb

keepalived (VRRPv3, advert_int 0.2, unicast) moves both virtual addresses together (a sync
group), tracking l4lb's track file with weight -50; both hosts have priority 100.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support import procs
from tests.support.procs import wait_for_line

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")
VIP, BACK_VIP = "10.1.0.100", "10.2.0.100"
BACKENDS = {"b1": "10.2.0.11", "b2": "10.2.0.12", "b3": "10.2.0.13"}
NETS = 24  # client /24s


def missing() -> str | None:
    """Why this machine cannot build the pair, or None."""
    if os.geteuid() != 0:
        return "builds network namespaces, runs keepalived and nftables: needs root (CI has it)"
    for tool in ("ip", "keepalived", "nft", "redis-server"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (make deps installs it)"
    return None


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


KEEPALIVED = """global_defs {{
  router_id {name}
  vrrp_version 3
  script_user root
  enable_script_security
}}
track_file l4lb {{
  file "{track}"
  weight -50
  init_file 0
}}
vrrp_sync_group pair {{
  group {{
    front
    back
  }}
  sync_group_tracking_weight
}}
vrrp_instance front {{
  state BACKUP
  interface f0
  virtual_router_id 51
  priority 100
  advert_int 0.2
  unicast_src_ip 10.1.0.{me}
  unicast_peer {{
    10.1.0.{other}
  }}
  virtual_ipaddress {{
    {vip}/24 dev f0
  }}
  track_file {{
    l4lb
  }}
}}
vrrp_instance back {{
  state BACKUP
  interface b0
  virtual_router_id 52
  priority 100
  advert_int 0.2
  unicast_src_ip 10.2.0.{me}
  unicast_peer {{
    10.2.0.{other}
  }}
  virtual_ipaddress {{
    {back_vip}/24 dev b0
  }}
  track_file {{
    l4lb
  }}
}}
"""

L4LB = """admin:
  listen: "10.2.0.{me}:9100"
  token_file: {token}
  read_token: true
affinity_store:
  url: "redis://10.2.0.10:6379/0"
ha:
  peer: "10.2.0.{other}:9100"
  track_file: {track}
  idle_sync: true
  timeout: 3s
groups:
  web:
    listen: [{vip}]
    ports: [8000, 7000, "5300/udp"]
    source: {back_vip}
    persistence: {{timeout: 600, netmask: 255.255.255.0}}
    health_check: {{type: tcp, interval: 1, timeout: 0.5}}
    backends: [{backends}]
"""


class PairLab:
    """The namespaces, links and processes; `close` ends every process (by PID) and deletes
    every namespace it made."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tag = secrets.token_hex(2)
        self.ns = {k: f"l4lbha{k}{tag}" for k in ("c", "h1", "h2", "b", "sw")}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.token = tmp / "token"
        self.token.write_text(secrets.token_urlsafe(32) + "\n")

    # ------------------------------------------------------------------ the network

    def build(self) -> None:
        ns = self.ns
        for name in ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "link", "set", "lo", "up", ns=name)
        sw = ns["sw"]
        for br in ("brf", "brb"):
            sh("ip", "link", "add", br, "type", "bridge", ns=sw)
            sh("ip", "link", "set", br, "up", ns=sw)
        links = [("c", "f0", "cf", "brf"), ("h1", "f0", "h1f", "brf"), ("h2", "f0", "h2f", "brf"),
                 ("h1", "b0", "h1b", "brb"), ("h2", "b0", "h2b", "brb"), ("b", "b0", "bb", "brb")]  # fmt: skip
        for host, inner, outer, br in links:
            sh("ip", "link", "add", inner, "netns", ns[host], "type", "veth", "peer", "name",
               outer, "netns", sw)  # fmt: skip
            sh("ip", "link", "set", outer, "master", br, "up", ns=sw)
            sh("ip", "link", "set", inner, "up", ns=ns[host])
        sh("ip", "addr", "add", "10.1.0.10/24", "dev", "f0", ns=ns["c"])
        for n in range(NETS):
            for h in (1, 2):
                sh("ip", "addr", "add", f"10.100.{n}.{h}/32", "dev", "lo", ns=ns["c"])
        for i, host in ((1, "h1"), (2, "h2")):
            sh("ip", "addr", "add", f"10.1.0.{i}/24", "dev", "f0", ns=ns[host])
            sh("ip", "addr", "add", f"10.2.0.{i}/24", "dev", "b0", ns=ns[host])
            sh("ip", "route", "add", "10.100.0.0/16", "via", "10.1.0.10", ns=ns[host])
        sh("ip", "addr", "add", "10.2.0.10/24", "dev", "b0", ns=ns["b"])
        for addr in BACKENDS.values():
            sh("ip", "addr", "add", f"{addr}/24", "dev", "b0", ns=ns["b"])

    # ------------------------------------------------------------------ processes

    def _start(self, key: str, ns: str, *argv: str, **kw: object) -> subprocess.Popen[str]:
        if key in self.procs:  # (started again: the old one is kept for `close`)
            self.procs[f"{key}.{len(self.procs)}"] = self.procs.pop(key)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[ns], *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.procs[key] = proc
        return proc

    def start_backends(self) -> None:
        redis = self._start("redis", "b", "redis-server", "--bind", "10.2.0.10", "--port",
                            "6379", "--save", "", "--appendonly", "no")  # fmt: skip
        wait_for_line(redis, "stdout", "Ready to accept connections", 20)
        for name, addr in BACKENDS.items():
            p = self._start(name, "b", PY, "-m", "tests.support.backend_server", "--name", name,
                            "--http", f"{addr}:8000", "--echo", f"{addr}:7000", "--udp",
                            f"{addr}:5300")  # fmt: skip
            wait_for_line(p, "stdout", "ready", 20)

    def track(self, i: int) -> Path:
        return self.tmp / f"h{i}.track"

    def start_keepalived(self, i: int) -> subprocess.Popen[str]:
        conf = self.tmp / f"keepalived{i}.conf"
        conf.write_text(
            KEEPALIVED.format(
                name=f"h{i}", track=self.track(i), me=i, other=3 - i, vip=VIP, back_vip=BACK_VIP
            )
        )
        run = self.tmp / f"run{i}"
        run.mkdir(exist_ok=True)
        return self._start(
            f"keepalived{i}", f"h{i}", "keepalived", "--dont-fork", "--log-console",
            "--vrrp", "-f", str(conf), "-p", str(run / "k.pid"), "-r", str(run / "v.pid"),
            "-c", str(run / "c.pid"),
        )  # fmt: skip

    def start_l4lb(self, i: int) -> subprocess.Popen[str]:
        conf = self.tmp / f"l4lb{i}.yaml"
        backends = ", ".join(f"{{name: {n}, address: {a}}}" for n, a in BACKENDS.items())
        conf.write_text(
            L4LB.format(
                me=i,
                other=3 - i,
                token=self.token,
                track=self.track(i),
                vip=VIP,
                back_vip=BACK_VIP,
                backends=backends,
            )
        )
        p = self._start(f"l4lb{i}", f"h{i}", PY, "-m", "l4lb", "run", "-c", str(conf))
        wait_for_line(p, "stderr", "ha: peer", 30)
        return p

    def holds(self, i: int) -> bool:
        return VIP in sh("ip", "-o", "addr", "show", "dev", "f0", ns=self.ns[f"h{i}"])

    def wait_holds(self, i: int, timeout: float = 15) -> float:
        t0 = time.monotonic()
        while not self.holds(i):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"host{i} did not take the addresses in {timeout}s")
            time.sleep(0.02)
        return time.monotonic() - t0

    def client(self, *argv: str) -> subprocess.Popen[str]:
        key = f"client{len(self.procs)}"
        return self._start(key, "c", PY, "-m", "tests.support.pair_client", *argv)

    def ctl(self, i: int, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = ["ip", "netns", "exec", self.ns[f"h{i}"], PY, "-m", "l4lb", "ctl", "--admin",
               f"10.2.0.{i}:9100", "--token-file", str(self.token), *argv]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)

    def curl(self, i: int, j: int, path: str, *argv: str, token: bool = True) -> tuple[int, str]:
        """From host i to host j's admin API: the status code and the body."""
        auth = ["-H", f"Authorization: Bearer {self.token.read_text().strip()}"] if token else []
        out = sh("curl", "-s", "-m", "10", "-w", "\n%{http_code}", *auth, *argv,
                 f"http://10.2.0.{j}:9100{path}", ns=self.ns[f"h{i}"])  # fmt: skip
        body, _, code = out.rpartition("\n")
        return int(code), body

    def stop(self, key: str) -> None:
        procs.stop(self.procs[key])

    def links_down(self, i: int) -> None:
        """Host i stops talking, as a machine that dies does: nothing more leaves it."""
        for dev in ("f0", "b0"):
            sh("ip", "link", "set", dev, "down", ns=self.ns[f"h{i}"])

    def kill(self, key: str) -> None:
        """kill -9 of the process and of the children it forked (keepalived's VRRP process:
        killed alone, the parent's death would make it resign politely)."""
        proc = self.procs[key]
        if proc.poll() is not None:
            return
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children", encoding="ascii") as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            children = []
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            procs.stop(proc)
            if proc.stdin is not None:
                proc.stdin.close()
            for stream in ("stdout", "stderr"):
                reader = procs._readers.pop((proc.pid, stream), None)
                procs._history.pop((proc.pid, stream), None)
                if reader is not None:
                    reader[1].join(10)  # (the pump closes the pipe at EOF)
                elif getattr(proc, stream) is not None:
                    getattr(proc, stream).close()
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
