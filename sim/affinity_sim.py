"""How many clients change backend when things change, at internet scale, for four designs.

M clients (masked addresses), N balancer instances, K backends. Every round each client opens
one connection through one instance; between rounds, `--route-churn` of the clients reach a
different instance than before (DNS answers, anycast or ECMP paths change). An event happens
before some rounds; the figure is the fraction of clients whose backend differs from their
previous round's. No sockets, no clocks: plain arrays (numpy), one step per round.

Designs:
- l4lb (wlc): what l4lb does with `affinity_store: redis` (l4lb/store.py): a local table per
  instance in front of a shared table; a new pin or a re-pin is claimed in Redis with a
  compare-and-set (the first instance's choice is everyone's); the group's scheduler (wlc,
  modelled as a weighted random pick) chooses new pins; with Redis down, the rendezvous hash
  (l4lb.core.schedulers.rendezvous, the same function) chooses; when Redis returns, each instance
  writes its pins with SET NX and takes Redis's where it already has one.
- l4lb (mh): the same with `scheduler: mh`: new pins by Maglev, and so is the fallback.
- maglev: stateless Maglev (Eisenbud et al. 2016), the table rebuilt over the live backends
  (l4lb.core.schedulers.Maglev builds it).
- rendezvous: stateless weighted rendezvous hashing over the live backends.
- local tables: a table per instance and no sharing (N independent LVS directors without
  the sync daemon, or N HAProxies without peers).

    python sim/affinity_sim.py                 # 10^6 clients, 4 instances, 10 backends
    python sim/affinity_sim.py --plot docs/sim-affinity.png --json sim/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4lb.config import BackendSpec
from l4lb.core.backends import Backend
from l4lb.core.keys import hash_key, hash_name
from l4lb.core.schedulers import Maglev, rendezvous

U64 = np.uint64
Ints = npt.NDArray[np.int64]
DESIGNS = ("l4lb (wlc)", "l4lb (mh)", "maglev", "rendezvous", "local tables")


def mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """l4lb.core.keys.hash_key for keys below 2**64, on arrays (uint64 arithmetic wraps)."""
    z = x.copy()
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


class World:
    """The backends as every design sees them: names, weights, which are alive."""

    def __init__(self, k: int) -> None:
        self.names = [f"b{i}" for i in range(k)]
        self.weights = [1] * k
        self.alive = [True] * k

    def add(self) -> int:
        self.names.append(f"b{len(self.names)}")
        self.weights.append(1)
        self.alive.append(True)
        return len(self.names) - 1

    def live(self) -> list[int]:
        return [i for i, a in enumerate(self.alive) if a and self.weights[i] > 0]

    def backends(self, only: list[int]) -> list[Backend]:
        return [
            Backend(
                BackendSpec(
                    name=self.names[i], address="10.0.0.1", ports={80: 80}, weight=self.weights[i]
                ),
                i,
            )
            for i in only
        ]


def hrw(keys: npt.NDArray[np.uint64], world: World) -> Ints:
    """l4lb.core.schedulers.rendezvous over the live backends, for every key at once."""
    kh = mix(keys)
    live = world.live()
    best = np.full(len(keys), -1.0)
    choice = np.full(len(keys), -1, dtype=np.int64)
    for i in live:
        seed = U64(hash_name(world.names[i], "hrw"))
        u = ((mix(kh ^ seed) >> U64(11)).astype(np.float64) + 0.5) / float(1 << 53)
        score = world.weights[i] / -np.log(u)
        better = score > best
        best[better] = score[better]
        choice[better] = i
    return choice


def maglev(keys: npt.NDArray[np.uint64], world: World) -> Ints:
    live = world.live()
    m = Maglev(world.backends(live))
    m.rebuild()
    table = np.array([b.index for b in m._table], dtype=np.int64)
    return table[(mix(keys) % U64(len(table))).astype(np.int64)]


class Sim:
    def __init__(self, m: int, n: int, k: int, churn: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.m, self.n, self.churn = m, n, churn
        # Distinct /24 client networks, as l4lb keys them (the masked IPv4 address).
        self.keys = (self.rng.choice(1 << 24, size=m, replace=False).astype(np.uint64)) << U64(8)
        self.world = World(k)
        self.instance = self.rng.integers(0, n, size=m)
        self.redis_up = True
        # l4lb, once per scheduler: the table in Redis, and each instance's local table
        self.shared = {s: np.full(m, -1, dtype=np.int64) for s in ("wlc", "mh")}
        self.cache = {s: np.full((n, m), -1, dtype=np.int64) for s in ("wlc", "mh")}
        self.alone = np.full((n, m), -1, dtype=np.int64)  # local tables, never shared
        self.last: dict[str, Ints] = {}
        self._hrw: Ints | None = None
        self._mh: Ints | None = None

    # ------------------------------------------------------------------ helpers

    def alive(self) -> npt.NDArray[np.bool_]:
        return np.array(self.world.alive, dtype=bool) & (np.array(self.world.weights) > 0)

    def usable(self, b: Ints) -> npt.NDArray[np.bool_]:
        """Pins that a backend may keep: alive (a weight of 0 still keeps its pins)."""
        alive = np.array(self.world.alive, dtype=bool)
        return (b >= 0) & alive[np.clip(b, 0, None)]

    def pick(self, count: int) -> Ints:
        """The scheduler's pick for new pins (wlc on even load: weighted random)."""
        live = self.world.live()
        w = np.array([self.world.weights[i] for i in live], dtype=np.float64)
        return np.array(live, dtype=np.int64)[self.rng.choice(len(live), size=count, p=w / w.sum())]

    def rendezvous_all(self) -> Ints:
        if self._hrw is None:
            self._hrw = hrw(self.keys, self.world)
        return self._hrw

    def maglev_all(self) -> Ints:
        if self._mh is None:
            self._mh = maglev(self.keys, self.world)
        return self._mh

    def changed(self) -> None:
        self._hrw = None
        self._mh = None

    # ------------------------------------------------------------------ one round

    def round(self) -> dict[str, Ints]:
        moving = self.rng.random(self.m) < self.churn
        self.instance[moving] = self.rng.integers(0, self.n, size=int(moving.sum()))
        return {
            "l4lb (wlc)": self._l4lb("wlc"),
            "l4lb (mh)": self._l4lb("mh"),
            "maglev": self.maglev_all().copy(),
            "rendezvous": self.rendezvous_all().copy(),
            "local tables": self._local(),
        }

    def _l4lb(self, scheduler: str) -> Ints:
        shared, cache = self.shared[scheduler], self.cache[scheduler]
        out = np.full(self.m, -1, dtype=np.int64)
        for i in range(self.n):
            at = np.nonzero(self.instance == i)[0]
            local = cache[i, at]
            hit = self.usable(local)
            out[at[hit]] = local[hit]
            need = at[~hit]  # new to this instance, or pinned to a dead backend here
            if not len(need):
                continue
            # The scheduler's pick, and what the instance does without Redis (a consistent
            # hash: the group's own for mh, rendezvous otherwise).
            if scheduler == "mh":
                candidate = fallback = self.maglev_all()[need]
            else:
                candidate, fallback = self.pick(len(need)), self.rendezvous_all()[need]
            if self.redis_up:
                cur = shared[need]
                old = cache[i, need]  # the pin being replaced (-1: none)
                # CLAIM: set ours if Redis has nothing or still the replaced pin; else theirs.
                theirs = (cur >= 0) & (cur != old)
                take = theirs & self.usable(cur)
                chosen = candidate.copy()
                chosen[take] = cur[take]
                shared[need[~theirs]] = chosen[~theirs]
                shared[need[theirs & ~take]] = chosen[theirs & ~take]  # flushed over
            else:
                chosen = fallback
            cache[i, need] = chosen
            out[need] = chosen
        return out

    def _local(self) -> Ints:
        out = np.full(self.m, -1, dtype=np.int64)
        for i in range(self.n):
            at = np.nonzero(self.instance == i)[0]
            local = self.alone[i, at]
            hit = self.usable(local)
            out[at[hit]] = local[hit]
            need = at[~hit]
            chosen = self.pick(len(need))
            self.alone[i, need] = chosen
            out[need] = chosen
        return out

    def reconcile(self) -> None:
        """Redis is back: SET NX GET of every local pin, instance by instance."""
        self.redis_up = True
        for scheduler, shared in self.shared.items():
            cache = self.cache[scheduler]
            for i in range(self.n):
                have = np.nonzero(cache[i] >= 0)[0]
                cur = shared[have]
                empty = cur < 0
                shared[have[empty]] = cache[i, have[empty]]
                adopt = ~empty & self.usable(cur) & (cur != cache[i, have])
                cache[i, have[adopt]] = cur[adopt]

    # ------------------------------------------------------------------ measuring

    def step(self, label: str, results: dict[str, dict[str, float]]) -> None:
        now = self.round()
        row = {}
        for d in DESIGNS:
            before = self.last.get(d)
            row[d] = float(np.mean(before != now[d])) if before is not None else 0.0
        results[label] = row
        self.last = now


def scenario(sim: Sim, log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    warm: dict[str, dict[str, float]] = {}
    for r in range(4):  # warm-up: every client pinned, on most instances
        sim.step(f"warm-up {r}", warm)

    def event(label: str, change: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        change()
        sim.changed()
        sim.step(label, results)
        cells = " ".join(f"{100 * results[label][d]:12.2f}%" for d in DESIGNS)
        log(f"{label:<24} {cells}   ({time.perf_counter() - t0:.1f}s)")

    def fail() -> None:
        sim.world.alive[3] = False

    def add() -> None:
        sim.world.add()

    def weight() -> None:
        sim.world.weights[0] = 2

    def restart() -> None:
        for cache in sim.cache.values():
            cache[0] = -1
        sim.alone[0] = -1

    def redis_down() -> None:
        sim.redis_up = False
        for shared in sim.shared.values():
            shared[:] = -1  # it restarts empty

    event("no change", lambda: None)
    event("a backend fails", fail)
    event("a backend is added", add)
    event("a weight doubles", weight)
    event("an instance restarts", restart)
    event("Redis goes down (empty)", redis_down)
    event("Redis still down", lambda: None)
    event("Redis is back", sim.reconcile)
    event("no change, after", lambda: None)
    return results


def check_twins() -> None:
    """The array versions are l4lb's own functions: checked on a sample before any figure."""
    world = World(7)
    world.weights[2] = 3
    keys = np.arange(1, 2001, dtype=np.uint64) * U64(2654435761)
    assert all(int(mix(keys)[j]) == hash_key(int(keys[j])) for j in range(0, 2000, 97))
    got = hrw(keys, world)
    bs = world.backends(world.live())
    for j in range(0, 2000, 41):
        want = rendezvous(int(keys[j]), bs)
        assert want is not None and want.index == got[j], j


def plot(results: dict[str, dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = list(results)
    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    width = 0.8 / len(DESIGNS)
    colors = ("#1f77b4", "#17becf", "#ff7f0e", "#2ca02c", "#d62728")
    for j, d in enumerate(DESIGNS):
        xs = [i + (j - (len(DESIGNS) - 1) / 2) * width for i in range(len(events))]
        ys = [100 * results[e][d] for e in events]
        ax.bar(xs, ys, width, label=d, color=colors[j])
        for x, y in zip(xs, ys, strict=True):
            if y >= 0.05:
                ax.text(x, y + 0.3, f"{y:.1f}", ha="center", va="bottom", fontsize=6.5)
    ax.set_xticks(range(len(events)))
    ax.set_xticklabels(events, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("clients that changed backend (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--route-churn", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", help="write a PNG here (needs matplotlib)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    check_twins()
    sim = Sim(args.clients, args.instances, args.backends, args.route_churn, args.seed)
    title = (
        f"{args.clients:,} clients, {args.instances} instances, {args.backends} backends, "
        f"{100 * args.route_churn:g}% of clients change instance each round"
    )
    print(title)
    print(f"{'event':<24} " + " ".join(f"{d:>13}" for d in DESIGNS))
    results = scenario(sim, print)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot, title)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
