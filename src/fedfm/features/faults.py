"""Simulated faults: clients that vanish mid-round (``federation.dropout``) and stragglers past a deadline
(``federation.deadline`` with ``step_seconds`` and ``slowness_spread``).

Both are pure functions of (seed, round, client), never of the machine or the server, so which clients fail is
reproducible and a resumed run meets the same faults. A dropout happens at the client, after it received its task
(after the key exchange under secure aggregation); a straggler received its task (its download is counted) but its
update would arrive after the round closed, so it is not trained.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedfm.client import derive_seed, examples_per_round
from fedfm.errors import ClientDropout
from fedfm.features.base import ClientRound, Feature, RoundContext

log = logging.getLogger("fedfm")


def round_seconds(app, index: int, round_: int, num_examples: int | None) -> float:
    """Simulated duration of a client's round: local steps x step_seconds x its slowness (device and load)."""
    fed = app.cfg.federation
    budget = num_examples or examples_per_round(len(app.shards[index].train), app.cfg.train)
    steps = math.ceil(budget / app.cfg.train.batch_size)
    s = fed.slowness_spread
    device = np.random.default_rng(derive_seed(app.cfg.seed, index, 0x51)).standard_normal()
    load = np.random.default_rng(derive_seed(app.cfg.seed, round_, index, 0x52)).standard_normal()
    return float(steps * fed.step_seconds * math.exp(s * device + 0.5 * s * load))


def drops_out(app, round_: int, index: int) -> bool:
    """Whether client ``index`` vanishes in ``round_`` (federation.dropout): the server's data never does."""
    p = app.cfg.federation.dropout
    if p == 0 or index >= len(app.split.client_names):
        return False
    return bool(np.random.default_rng(derive_seed(app.cfg.seed, round_, index, 0xD80)).random() < p)


class Faults(Feature):
    name = "federation.dropout / deadline"

    def __init__(self, app):
        self.app, self.fed = app, app.cfg.federation

    @classmethod
    def active(cls, cfg) -> bool:
        f = cfg.federation
        return f.dropout > 0 or f.deadline is not None or f.slowness_spread > 0

    @property
    def timed(self) -> bool:
        return self.fed.deadline is not None or self.fed.slowness_spread > 0

    def client_before(self, c: ClientRound) -> None:
        if drops_out(self.app, c.task.round, c.index):
            raise ClientDropout(f"client {c.index} vanished in round {c.task.round} (simulated)")

    def select(self, ctx: RoundContext, group, members: list[int]) -> list[int]:
        """The clients that report before the deadline; the stragglers go to ``ctx.late``."""
        if not ctx.federated or not self.timed:
            return members
        notes = ctx.scratch.setdefault(self.name, {"stragglers": [], "timing": {}})
        on_time, late = [], []
        for i in members:
            t = round_seconds(self.app, i, ctx.round, group.num_examples)
            if self.fed.deadline is not None and t > self.fed.deadline:
                late.append({"client": self.app.shards[i].name, "seconds": round(t, 3)})
                ctx.late.append(i)
            else:
                on_time.append(i)
                notes["timing"][self.app.shards[i].name] = t
        if late:
            log.warning("round %d: %d stragglers past the %.1f s deadline excluded: %s", ctx.round, len(late),
                        self.fed.deadline, ", ".join(s["client"] for s in late))
            notes["stragglers"] += late
        return on_time

    def after_round(self, ctx: RoundContext, states, groups) -> None:
        if not ctx.federated or not self.timed:
            return
        notes = ctx.scratch.get(self.name, {"stragglers": [], "timing": {}})
        stragglers, timing = notes["stragglers"], notes["timing"]
        if stragglers or timing:
            ctx.record["stragglers"] = stragglers
            # the round closes when its last on-time client reports, or at the deadline if someone is late
            last = max((timing[u.client] for u in ctx.reports if u.client in timing), default=0.0)
            ctx.record["round_sim_s"] = self.fed.deadline if stragglers else last
