"""The container image for real: built from docker/Dockerfile on a Debian base made here
(mmdebstrap; no registry can be pulled from), with wheels prepared outside the build, then run
as the two shapes docker/ ships, with its own compose files and examples:

- the sidecar: an app container (two real backend processes, on its own loopback only) and l4lb
  sharing its network namespace; clients are curl inside that namespace (nsenter);
- the edge: l4lb on the host's network, backends and curl on this host's loopback.

Checked: stickiness over both ports per client /24, the HEALTHCHECK turning healthy, the state
file written in the volume by the non-root user and its pins surviving a container restart, and
`docker stop` draining within shutdown_timeout with exit code 0, and a new container taking an
open connection over from the old through the hand-over socket in the state volume (issue 35).
All traffic stays on loopback.
Needs root, docker.io, docker-compose and mmdebstrap (`make deps`); dockerd is started here
(its own data root) when none runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import free_ports
from tests.support.procs import ROOT, processes, start_backend

BASE = "l4lb-test-base:bookworm"
IMAGE = "l4lb:test"
TOOLS = ("docker", "dockerd", "docker-compose", "mmdebstrap", "nsenter", "curl")
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
        reason="container tests need root and " + ", ".join(TOOLS) + " (make deps installs them)",
    ),
    # The first test's setup builds the image: the wheels, l4lb's compiled (mypyc, 40-60 s on a
    # busy 2-core machine), and the docker build; 120 s (the suite's) was overrun in CI.
    pytest.mark.timeout(600),
]


def run(
    *argv: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def engine_answers() -> bool:
    return run("docker", "info", timeout=30, check=False).returncode == 0


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A running dockerd: the machine's, or one started here (and ended by its PID)."""
    if engine_answers():
        yield
        return
    root = Path("/var/lib/l4lb-test-docker")
    root.mkdir(exist_ok=True)
    log = open(root / "dockerd.log", "w")  # noqa: SIM115 (open for the daemon's life)
    daemon = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--data-root",
            str(root),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd could not start: {(root / 'dockerd.log').read_text()[-400:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


@pytest.fixture(scope="module")
def image(engine: None) -> str:
    """l4lb's image, built on a Debian base made by mmdebstrap (kept between runs)."""
    if run("docker", "image", "inspect", BASE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            tar = f"{tmp}/base.tar"
            run(
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                tar,
                "http://deb.debian.org/debian",
                timeout=600,
            )
            run("docker", "import", tar, BASE, timeout=300)
    with tempfile.TemporaryDirectory() as ctx:
        for part in ("pyproject.toml", "README.md", "setup.py"):
            shutil.copy(ROOT / part, ctx)
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "native.stamp")
        shutil.copytree(ROOT / "l4lb", f"{ctx}/l4lb", ignore=ignore)
        shutil.copytree(ROOT / "docker", f"{ctx}/docker")
        wheels = f"{ctx}/docker/wheels"
        pip = (sys.executable, "-m", "pip")
        # l4lb's wheel compiled here (the image's Python is this machine's Debian 3.11; no
        # compiler in the image), the dependencies' wheels beside it: an offline build
        env = {**os.environ, "L4LB_COMPILE": "1"}
        run(*pip, "wheel", "-q", "--no-build-isolation", ctx, "-w", wheels, timeout=600, env=env)
        # Debian 12's Python is 3.11.2: redis wants async-timeout below 3.11.3
        run(*pip, "download", "-q", "async-timeout", "-d", wheels, timeout=600)
        run("docker", "build", "-q", "-f", f"{ctx}/docker/Dockerfile", "--build-arg",
            f"BASE={BASE}", "--build-arg", f"BUILDER={BASE}", "-t", IMAGE, ctx, timeout=900)  # fmt: skip
    # the image ships the compiled hot path (issue 26), and says so
    version = run("docker", "run", "--rm", "--network", "none", "--entrypoint", "l4lb", IMAGE,
                  "--version").stdout  # fmt: skip
    assert "compiled (mypyc" in version, version
    return IMAGE


@contextlib.contextmanager
def compose(shape: str, override: str) -> Iterator[list[str]]:
    """docker-compose with the shipped file and examples, plus a test override (the app's image
    and command, the image built here); everything it made is removed afterwards."""
    project = f"l4lbtest{shape}{hashlib.sha1(str(time.time()).encode()).hexdigest()[:6]}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / "docker") as extra:
        extra.write(override)
        extra.flush()
        argv = ["docker-compose", "-p", project, "-f", str(ROOT / "docker" / f"compose.{shape}.yaml"),
                "-f", extra.name]  # fmt: skip
        try:
            run(*argv, "up", "-d", "--no-build", timeout=300)
            yield argv
        finally:
            run(*argv, "down", "-v", "-t", "20", timeout=300, check=False)


def container(argv: list[str], service: str) -> str:
    return run(*argv, "ps", "-q", service).stdout.strip()


def wait_healthy(cid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(run("docker", "inspect", cid).stdout)[0]["State"]
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if not state["Running"] or time.monotonic() > deadline:
            logs = run("docker", "logs", cid, check=False)
            raise AssertionError(f"not healthy: {state}\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


def curl(url: str, source: str, netns_pid: int | None = None) -> str:
    argv = ["curl", "-sk", "--max-time", "5", "--interface", source, url]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", *argv]
    return run(*argv, timeout=15, check=False).stdout.strip()


def sticky(ports: tuple[int, int], netns_pid: int | None = None) -> dict[int, str]:
    """Two hosts of each of six /24s over both ports: the backend each /24 reached."""
    seen: dict[int, set[str]] = {}
    for net in range(6):
        for host in (1, 2):
            for scheme, port in zip(("http", "https"), ports, strict=True):
                answer = curl(
                    f"{scheme}://127.0.0.1:{port}/", f"127.0.{net + 30}.{host}", netns_pid
                )
                seen.setdefault(net, set()).add(answer)
    assert all(len(v) == 1 for v in seen.values()), seen
    return {net: next(iter(v)) for net, v in seen.items()}


def stop_drains(
    cid: str, shutdown_timeout: float, idle: contextlib.AbstractContextManager[object]
) -> None:
    """`docker stop` with an idle client connected (`idle`): l4lb waits for it up to
    shutdown_timeout, then exits 0, well before docker's own deadline would SIGKILL it."""
    with idle:
        t0 = time.monotonic()
        run("docker", "stop", "-t", "30", cid, timeout=60)
        took = time.monotonic() - t0
    state = json.loads(run("docker", "inspect", cid).stdout)[0]["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert took <= shutdown_timeout + 3, took


@contextlib.contextmanager
def idle_client_in(netns_pid: int, port: int) -> Iterator[None]:
    """A client connected from inside a network namespace, idle until the block ends."""
    proc = subprocess.Popen(
        ["nsenter", f"--net=/proc/{netns_pid}/ns/net", sys.executable, "-c",
         f"import socket,sys; s=socket.create_connection(('127.0.0.1',{port}));"
         "print('up',flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
            yield
        finally:
            proc.kill()


def pid_of(cid: str) -> int:
    return int(run("docker", "inspect", "-f", "{{.State.Pid}}", cid).stdout)


def in_volume(cid: str) -> str:
    """Owner and mode of the state file in the volume."""
    return run("docker", "exec", cid, "stat", "-c", "%U %a", "/var/lib/l4lb/pins.json").stdout


def test_the_sidecar_shape(image: str) -> None:
    # (a backend_server runs until its stdin closes: a pipe from sleep keeps it open)
    workers = " & ".join(
        "sleep infinity | python3 -m tests.support.backend_server"
        f" --name {n} --http 127.0.0.1:{h} --https 127.0.0.1:{s}"
        for n, h, s in (("worker1", 9001, 9441), ("worker2", 9002, 9442))
    )
    override = f"""
services:
  app:
    image: {BASE}
    network_mode: none
    volumes: ["{ROOT}:/src:ro"]
    working_dir: /src
    command: ["sh", "-c", "{workers} & wait"]
  l4lb:
    image: {image}
"""
    with compose("sidecar", override) as argv:
        app, lb = container(argv, "app"), container(argv, "l4lb")
        wait_healthy(lb)
        netns = pid_of(app)
        before = sticky((8080, 8443), netns)
        assert set(before.values()) == {"worker1", "worker2"}
        run("docker", "restart", "-t", "20", lb, timeout=60)  # SIGTERM: the pins are saved
        assert in_volume(lb).startswith("l4lb ")  # written by the image's own user
        wait_healthy(lb)
        assert sticky((8080, 8443), netns) == before  # the pins came back from the volume

        stop_drains(lb, 10, idle_client_in(netns, 8080))


def edge_config(folder: Path, front_http: int, front_https: int, admin: int, b: list[int]) -> None:
    """The shipped edge example on free ports (it takes the host's network, where 8080 and
    9090 may be taken), with a token of the test's own beside it, readable by the image's
    user."""
    text = (ROOT / "docker" / "examples" / "edge.yaml").read_text()
    shipped = text
    text = text.replace('listen: "127.0.0.1:9090"', f'listen: "127.0.0.1:{admin}"')
    text = text.replace("ports: [8080, 8443]", f"ports: [{front_http}, {front_https}]")
    text = text.replace(
        'address: "127.0.0.1:18081"',
        f"address: 127.0.0.1, ports: {{{front_http}: {b[0]}, {front_https}: {b[1]}}}",
    )
    text = text.replace(
        'address: "127.0.0.1:18082"',
        f"address: 127.0.0.1, ports: {{{front_http}: {b[2]}, {front_https}: {b[3]}}}",
    )
    assert text.count(str(front_http)) == 3 and text != shipped, "the edge example changed shape"
    folder.chmod(0o755)
    (folder / "edge.yaml").write_text(text)
    (folder / "admin.token").write_text(secrets.token_urlsafe(24))
    for f in folder.iterdir():
        f.chmod(0o644)


def test_the_edge_shape(image: str) -> None:
    front_http, front_https, admin, *b = free_ports(7)
    with tempfile.TemporaryDirectory(dir=ROOT / "docker") as mounted, processes() as procs:
        edge_config(Path(mounted), front_http, front_https, admin, b)
        override = f"""
services:
  l4lb:
    image: {image}
    volumes:
      - {mounted}/edge.yaml:/etc/l4lb/l4lb.yaml:ro
      - {mounted}/admin.token:/etc/l4lb/admin.token:ro
"""
        procs.append(start_backend("shop1", http=f"127.0.0.1:{b[0]}", https=f"127.0.0.1:{b[1]}"))
        procs.append(start_backend("shop2", http=f"127.0.0.1:{b[2]}", https=f"127.0.0.1:{b[3]}"))
        with compose("edge", override) as argv:
            lb = container(argv, "l4lb")
            wait_healthy(lb)
            before = sticky((front_http, front_https))
            assert set(before.values()) == {"shop1", "shop2"}
            token = (Path(mounted) / "admin.token").read_text().strip()
            drained = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                          "-H", f"Authorization: Bearer {token}", "-d", '{"state": "up"}',
                          f"http://127.0.0.1:{admin}/api/v1/backends/shop/shop1")  # fmt: skip
            assert drained.stdout == "200"  # the mounted token file is the one l4lb reads
            run("docker", "restart", "-t", "20", lb, timeout=60)
            assert in_volume(lb).startswith("l4lb ")
            wait_healthy(lb)
            assert sticky((front_http, front_https)) == before

            stop_drains(lb, 10, socket.create_connection(("127.0.0.1", front_http), timeout=5))


def test_a_new_container_takes_over_through_the_shared_volume(image: str) -> None:
    """Issue 35, the edge shape's upgrade across images (docs/deployment.md): the running
    container listens on a hand-over socket in its state volume; a new container, given the
    old one's volumes, takes everything over there. A connection open through the old one
    echoes on through the new one; the old one exits 0."""
    port, echo1, echo2 = free_ports(3)
    volume = f"l4lbtest{secrets.token_hex(4)}"
    door = "/var/lib/l4lb/handover.sock"
    names: list[str] = []
    with tempfile.TemporaryDirectory(dir=ROOT / "docker") as mounted, processes() as procs:
        folder = Path(mounted)
        folder.chmod(0o755)
        (folder / "l4lb.yaml").write_text(
            f"groups:\n  echo:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
            "    persistence: {timeout: 10m, netmask: /24}\n    backends:\n"
            f"      - {{name: e1, address: '127.0.0.1:{echo1}'}}\n"
            f"      - {{name: e2, address: '127.0.0.1:{echo2}'}}\n"
        )
        (folder / "l4lb.yaml").chmod(0o644)
        procs.append(start_backend("e1", echo=f"127.0.0.1:{echo1}"))
        procs.append(start_backend("e2", echo=f"127.0.0.1:{echo2}"))
        try:
            old = run("docker", "run", "-d", "--network", "host",
                      "-v", f"{folder}/l4lb.yaml:/etc/l4lb/l4lb.yaml:ro",
                      "-v", f"{volume}:/var/lib/l4lb", image, "--handover-socket", door,
                      timeout=60).stdout.strip()  # fmt: skip
            names.append(old)
            logged(old, "may take over")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"before\n")
                assert client.recv(100) == b"before\n"
                new = run("docker", "run", "-d", "--network", "host", "--volumes-from", old,
                          image, "--handover-socket", door, "--take-over", door,
                          timeout=60).stdout.strip()  # fmt: skip
                names.append(new)
                assert run("docker", "wait", old, timeout=60).stdout.strip() == "0"
                client.sendall(b"after\n")
                assert client.recv(100) == b"after\n"  # the same connection, now the new one's
            assert "upgrade: took over" in logged(new, "may take over")
            assert "handed over 1 listeners, 1 connections" in logs(old)
        finally:
            for name in names:
                run("docker", "rm", "-f", name, check=False, timeout=60)
            run("docker", "volume", "rm", "-f", volume, check=False, timeout=60)


def logs(cid: str) -> str:
    got = run("docker", "logs", cid, check=False, timeout=60)
    return got.stdout + got.stderr


def logged(cid: str, text: str, timeout: float = 60) -> str:
    """The container's log once `text` is in it."""
    deadline = time.monotonic() + timeout
    while text not in (out := logs(cid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{out}")
        time.sleep(0.2)
    return out
