"""An HA pair with real keepalived, real nftables and a real redis-server, in network namespaces
the test makes (tests/support/pairlab.py): a planned hand-over moves 20 open echo connections to
the peer (TCP_REPAIR) and they echo on, in order; an unplanned failover (kill -9 of the active
host's keepalived and l4lb) keeps every pin. `make test-ha` runs it; CI runs it as root."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pairlab import NETS, VIP, PairLab, missing
from tests.support.procs import wait_for_line

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(missing() is not None, reason=str(missing()))]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[PairLab]:
    lab = PairLab(tmp_path)
    try:
        lab.build()
        lab.start_backends()
        lab.start_keepalived(1)
        lab.wait_holds(1)  # (host1 first: at equal priorities the other does not preempt it)
        lab.start_keepalived(2)
        lab.start_l4lb(1)
        lab.start_l4lb(2)
        yield lab
    finally:
        lab.close()


def _json(proc: subprocess.Popen[str]) -> dict[str, object]:
    """The client's JSON line (its stdout is read by a pump once `wait_for_line` looked)."""
    line = wait_for_line(proc, "stdout", "{", 120)[-1]
    answer = json.loads(line)
    assert isinstance(answer, dict)
    return answer


def _who(lab: PairLab, nets: list[int]) -> dict[str, str]:
    answer = _json(lab.client("who", VIP, "8000", ",".join(map(str, nets))))
    return {k: str(v) for k, v in answer.items()}


def test_planned_handover_moves_open_connections(pair: PairLab) -> None:
    nets = list(range(20))
    pins = _who(pair, list(range(NETS)))
    echo = pair.client("echo", VIP, "7000", ",".join(map(str, nets)))
    wait_for_line(echo, "stdout", "ready", 30)
    datagrams = pair.client("udp", VIP, "5300", "20,21,22,23")
    wait_for_line(datagrams, "stdout", "ready", 30)
    time.sleep(0.5)  # (they echo meanwhile: the hand-over meets them mid-conversation)
    done = pair.ctl(1, "handover")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "handed over 20 connections and 4 flows" in done.stdout, done.stdout
    print(f"planned hand-over: {done.stdout.strip()}")
    assert pair.holds(2) and not pair.holds(1)
    time.sleep(1.0)  # (they echo on through host2)
    for client in (echo, datagrams):
        assert client.stdin is not None
        client.stdin.write("stop\n")
        client.stdin.flush()
    result = _json(echo)
    flows = _json(datagrams)["flows"]
    assert isinstance(flows, list)
    for flow in flows:  # (each flow on one backend throughout, and answered after the move)
        assert len(flow["names"]) == 1 and flow["answered"] >= 20, flows
    print(f"planned hand-over: UDP datagrams unanswered {[f['unanswered'] for f in flows]}")
    conns = result["conns"]
    assert isinstance(conns, list)
    errors = [c["error"] for c in conns if c["error"]]
    assert not errors, errors
    assert all(int(c["echoes"]) >= 20 for c in conns), conns  # (on through the move)
    worst = max(float(c["worst"]) for c in conns)
    print(f"planned hand-over: 20 connections, longest echo pause {worst * 1000:.0f} ms")
    status = pair.ctl(2, "status")
    assert status.returncode == 0, status.stderr
    assert "taken 20" in status.stdout, status.stdout
    assert "this host active" in status.stdout, status.stdout
    _, metrics = pair.curl(1, 2, "/metrics")
    assert 'l4lb_handover_connections_total{result="taken"} 20.0' in metrics
    _, metrics = pair.curl(2, 1, "/metrics")
    assert 'l4lb_handover_connections_total{result="moved"} 20.0' in metrics
    assert _who(pair, list(range(NETS))) == pins  # (new connections: the backends they had)


def test_a_hand_over_that_cannot_finish_leaves_everything_serving(pair: PairLab) -> None:
    """The peer's keepalived is stopped: the addresses cannot move, the peer gives up after
    ha.timeout, and every connection goes on through host1 as if nothing happened."""
    pair.stop("keepalived2")
    echo = pair.client("echo", VIP, "7000", ",".join(map(str, range(20))))
    wait_for_line(echo, "stdout", "ready", 30)
    done = pair.ctl(1, "handover")
    assert done.returncode == 1, done.stdout
    assert "everything still served here" in done.stderr, done.stderr
    assert "did not come to this host" in done.stderr, done.stderr
    time.sleep(1.0)  # (they echo on through host1)
    assert pair.holds(1) and not pair.holds(2)
    assert echo.stdin is not None
    echo.stdin.write("stop\n")
    echo.stdin.flush()
    conns = _json(echo)["conns"]
    assert isinstance(conns, list)
    assert not [c["error"] for c in conns if c["error"]], conns
    assert all(int(c["echoes"]) >= 20 for c in conns), conns
    status = pair.ctl(1, "status")
    assert "kept on a failed hand-over 20" in status.stdout, status.stdout


def test_the_peer_link_takes_the_token_and_checked_records_only(pair: PairLab) -> None:
    prepare = "/api/v1/ha/prepare"
    body = '{"id": "x", "conns": []}'
    code, _ = pair.curl(1, 2, prepare, "-X", "POST", "-d", body, token=False)
    assert code == 401
    bad = '{"id": "x", "conns": [{"group": "web", "backend": "b1", "tcp": [1, 2]}]}'
    code, answer = pair.curl(1, 2, prepare, "-X", "POST", "-d", bad)
    assert code == 409 and "a record from the peer" in answer, answer
    code, answer = pair.curl(1, 2, "/api/v1/ha/idle", "-X", "POST", "-d", '{"session": 5}')
    assert code == 409 and "session" in answer, answer
    code, answer = pair.curl(1, 2, "/api/v1/ha/commit", "-X", "POST", "-d", '{"id": "y"}')
    assert code == 409 and "no such hand-over" in answer, answer
    code, answer = pair.curl(1, 2, "/api/v1/ha")
    assert code == 200 and '"busy": false' in answer and '"role": "standby"' in answer, answer
    _, metrics = pair.curl(1, 2, "/metrics")
    assert 'l4lb_admin_requests_refused_total{reason="unauthorized"} 1.0' in metrics
    assert 'l4lb_admin_requests_refused_total{reason="ha_refused"} 3.0' in metrics
    done = pair.ctl(1, "handover")  # (and the pair still works)
    assert done.returncode == 0 and "handed over 0 connections" in done.stdout, done.stderr


def test_unplanned_failover_keeps_every_pin(pair: PairLab) -> None:
    nets = list(range(NETS))
    pins = _who(pair, nets)
    stream = pair.client("stream", VIP, "8000", ",".join(map(str, nets)), "6")
    wait_for_line(stream, "stdout", "ready", 30)
    time.sleep(1.5)
    killed = time.time()
    pair.kill("keepalived1")
    pair.kill("l4lb1")
    pair.wait_holds(2)
    takeover = time.time() - killed
    tries = _json(stream)["tries"]
    assert isinstance(tries, list)
    after = [t for t in tries if t["began"] >= killed]
    served = [t for t in after if t["backend"] is not None]
    assert served, "nothing was served after the kill"
    resumed = min(t["ended"] for t in served) - killed  # (the first new client served again)
    moved = [t for t in tries if t["backend"] is not None and t["backend"] != pins[str(t["net"])]]
    print(
        f"unplanned failover: keepalived took over in {takeover * 1000:.0f} ms; new connections"
        f" served again {resumed * 1000:.0f} ms after the kill; {len(after) - len(served)} of"
        f" {len(after)} tries after the kill failed; {len(moved)} pins lost"
    )
    assert not moved, moved
    assert resumed <= takeover + 0.5
    status = pair.ctl(2, "status")
    assert "failovers seen 1" in status.stdout, status.stdout


def test_idle_connections_survive_the_active_host_dying(pair: PairLab) -> None:
    """The stretch: 10 connections idle for 3 s, then the active host dies as a machine does
    (its links down first, then its processes killed); the standby makes again the ones the
    active host streamed to it (ha.idle_sync), and they answer; the standby restarted while
    they were idle, so the copies it holds are the ones the active host sent it again."""
    idle = pair.client("idle", VIP, "7000", ",".join(map(str, range(10))))
    wait_for_line(idle, "stdout", "ready", 30)
    time.sleep(1.5)
    pair.stop("l4lb2")  # (a standby that restarts has lost its copies: they are sent again)
    pair.start_l4lb(2)
    time.sleep(3.0)
    died = time.time()
    pair.links_down(1)
    pair.kill("keepalived1")
    pair.kill("l4lb1")
    pair.wait_holds(2)
    wait_for_line(pair.procs["l4lb2"], "stderr", "idle connections the failed peer held", 15)
    made = time.time() - died
    assert idle.stdin is not None
    idle.stdin.write("go\n")
    idle.stdin.flush()
    answer = _json(idle)
    print(
        f"idle connections through a crash: {answer['answered']} of 10 answered through the"
        f" standby (made again {made * 1000:.0f} ms after the links went down); {answer['errors']}"
    )
    assert answer["answered"] == 10, answer
