"""The simulation's figures hold the properties the README states (a small run of it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sim"))

from affinity_sim import Sim, check_twins, scenario


def test_the_simulation_shows_what_the_readme_says() -> None:
    check_twins()  # its array hashes are l4lb's own
    r = scenario(Sim(m=20_000, n=4, k=10, churn=0.1, seed=3), lambda line: None)
    ours = r["no change"]["l4lb (wlc)"], r["a backend is added"]["l4lb (wlc)"]
    assert ours == (0.0, 0.0)
    assert r["a weight doubles"]["l4lb (wlc)"] == 0.0
    assert r["an instance restarts"]["l4lb (wlc)"] == 0.0  # its pins come back from Redis
    # A failed backend's clients, about a tenth, must move, and no one else.
    assert 0.08 < r["a backend fails"]["l4lb (wlc)"] < 0.12
    assert abs(r["a backend fails"]["l4lb (wlc)"] - r["a backend fails"]["rendezvous"]) < 0.01
    assert r["a backend is added"]["maglev"] > 0.05 and r["a backend is added"]["rendezvous"] > 0.05
    # Without sharing, clients move whenever they reach another instance.
    assert r["no change"]["local tables"] > 0.04
    assert r["an instance restarts"]["local tables"] > 0.2
    # A Redis outage costs the clients that reach an instance which does not know them;
    # with mh as the scheduler the fallback mostly agrees with the pins.
    assert 0.02 < r["Redis goes down (empty)"]["l4lb (wlc)"] < 0.1
    assert (
        r["Redis goes down (empty)"]["l4lb (mh)"] < r["Redis goes down (empty)"]["l4lb (wlc)"] / 2
    )
    assert r["no change, after"]["l4lb (wlc)"] < 0.005
