"""The hand-over's format (runtime/handform.py): a recorded format 1 hand-over is read, and
what is not a record of ours is refused in one line before anything moves."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import pytest

from l4lb.config import load_config_text
from l4lb.core.routing import Router
from l4lb.runtime.channel import Channel
from l4lb.runtime.handform import READS, HandoverError, check_conn, check_flow
from l4lb.runtime.handover import Takeover
from tests.support.helpers import FakeClock

RECORDED = json.loads((Path(__file__).parents[1] / "data" / "handover-v1-records.json").read_text())


def routers() -> dict[str, Router]:
    text = (
        "groups:\n  shop:\n    listen: [127.0.0.1]\n    ports: [8080, '8053/udp']\n    backends:\n"
        "      - {name: b0, address: 192.0.2.1}\n      - {name: b1, address: 192.0.2.2}\n"
    )
    return {"shop": Router(load_config_text(text).groups[0], FakeClock())}


def test_a_recorded_format_1_hand_over_is_read() -> None:
    assert 1 in READS
    conn = check_conn(RECORDED["conn"], routers())
    assert conn["backend"] == "b0" and conn["to_client"] == b"hi" and conn["peer"][1] == 41522
    flow = check_flow(RECORDED["flow"], routers())
    assert flow["spare"] == -1 and flow["client"] == ("127.0.80.1", 50314)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"group": "gone"}, "group 'gone', which is not here"),
        ({"backend": "b9"}, "no backend 'b9'"),
        ({"phase": 1}, "only a paired connection"),
        ({"to_backend": "%%%"}, "to_backend: not base64"),
        ({"key": -1}, "key: not a number"),
        ({"eof": [1, 0]}, "eof: not [client, backend]"),
        ({"peer": ["h", 70000]}, "peer: not a number"),
    ],
)
def test_a_record_that_is_not_ours_is_refused_in_one_line(
    change: dict[str, object], said: str
) -> None:
    with pytest.raises(HandoverError, match=re.escape(said)):
        check_conn({**RECORDED["conn"], **change}, routers())


async def test_an_unknown_format_is_refused_before_anything_moves() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old, new = Channel(a), Channel(b)
    takeover = Takeover(new)
    receiving = asyncio.create_task(takeover.receive(routers()))
    got = await old.recv()
    assert got is not None and got[0]["t"] == "hello" and got[0]["reads"] == list(READS)
    old.send({"t": "begin", "format": 7})
    with pytest.raises(HandoverError, match="unknown hand-over format 7"):
        await receiving
    assert takeover.listeners == {} and takeover.conns == []
    old.close()
    new.close()
