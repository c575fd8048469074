"""The container image's contract, checked without a Docker engine: its entry point is exactly
`l4lb run -c /etc/l4lb/l4lb.yaml` (the command every end-to-end test runs), and its HEALTHCHECK
command answers for a running balancer."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.helpers import free_ports
from tests.support.procs import ROOT, l4lb_cli, processes, start_l4lb

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    m = re.search(rf"^{name} (?:.*?CMD )?(\[.*\])$", DOCKERFILE, re.M)
    assert m, name
    return json.loads(m.group(1))


def test_entry_point_and_healthcheck_commands() -> None:
    assert instruction("ENTRYPOINT") == ["l4lb", "run", "-c", "/etc/l4lb/l4lb.yaml"]
    assert instruction("HEALTHCHECK") == ["l4lb", "healthcheck", "-c", "/etc/l4lb/l4lb.yaml"]
    assert re.search(r"^USER l4lb$", DOCKERFILE, re.M) and re.search(
        r"^STOPSIGNAL SIGTERM$", DOCKERFILE, re.M
    )
    for compose in (ROOT / "docker").glob("compose.*.yaml"):
        assert "l4lb" in yaml.safe_load(compose.read_text())["services"]


def healthcheck(config: Path) -> int:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "healthcheck", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    ).returncode


def test_healthcheck_answers_for_a_running_balancer(tmp_path: Path) -> None:
    port, admin = free_ports(2)
    config = tmp_path / "l4lb.yaml"
    config.write_text(
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n    backends: [{{name: a, address: 127.0.0.1, ports: {{{port}: 1}}}}]\n"
    )
    assert healthcheck(config) == 1  # nothing running yet
    with processes() as procs:
        procs.append(start_l4lb(config))
        assert healthcheck(config) == 0
    plain = tmp_path / "plain.yaml"
    plain.write_text(config.read_text().split("\n", 1)[1])
    assert healthcheck(plain) == 0  # no admin API: nothing to ask, the process is the health


def test_the_shipped_examples_are_valid_configurations(tmp_path: Path) -> None:
    """What the image bakes in and what the compose files mount: `l4lb check` accepts each
    (the default's `app` need not resolve here: a warning, not an error)."""
    examples = sorted((ROOT / "docker" / "examples").glob("*.yaml"))
    assert {p.name for p in examples} == {"default.yaml", "edge.yaml", "sidecar.yaml"}
    token = tmp_path / "admin.token"  # the one the docs' command makes (none is shipped)
    token.write_text(secrets.token_urlsafe(32))
    for compose in (ROOT / "docker").glob("compose.*.yaml"):
        for volume in yaml.safe_load(compose.read_text())["services"]["l4lb"]["volumes"]:
            source = volume.split(":", 1)[0]
            if source == "./examples/admin.token":
                continue
            if source.startswith("./"):
                assert (ROOT / "docker" / source).exists(), f"{compose.name} mounts {source}"
    for path in examples:
        text = path.read_text().replace("/etc/l4lb/admin.token", str(token))
        tmp = tmp_path / path.name
        tmp.write_text(text.replace("/var/lib/l4lb/", f"{tmp_path}/"))
        out = l4lb_cli("check", "-c", str(tmp))
        assert out.returncode == 0, (path.name, out.stderr)
