"""``dpsgd``: example-level DP-SGD inside local training (Opacus; per-example clipping and noise in the loop).

The training loop runs it (``fedfm.client``); this feature gives the loop its noise seed, drawn from the client's
own secret (not from the public run seed), and reports the example-level epsilon after each round.
"""

from __future__ import annotations

import math
from typing import Any

from fedfm.client import derive_seed, examples_per_round
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.privacy import dp
from fedfm.round.groups import shard_sizes


class DPSGD(Feature):
    name = "dpsgd"

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg.dpsgd

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.dpsgd.enabled

    def client_before(self, c: ClientRound) -> None:
        if not self.cfg.seeded_noise:
            c.noise_seed = derive_seed(*c.noise_secret(), c.task.round, 0xD5)

    def example_privacy(self, engine, rounds: int) -> dict[str, float]:
        """DP-SGD's example-level epsilon after ``rounds``: an upper bound over clients, as if every client had
        taken part in every round with the largest step count and the highest sampling rate of any shard."""
        if not self.cfg.poisson:  # fixed-size shuffled batches: the Poisson accountant does not apply
            return {}
        app = self.app
        sizes = [shard_sizes(app, engine, i)[0] for i in range(len(app.split.client_names))]
        batch = app.cfg.train.batch_size
        steps = max(math.ceil(examples_per_round(n, app.cfg.train) / batch) for n in sizes)
        return {"example_epsilon": dp.poisson_epsilon(rounds * steps, batch / min(sizes), self.cfg.noise_multiplier,
                                                      self.cfg.delta)}

    def after_round(self, ctx: RoundContext, states, groups) -> None:
        ctx.record.update(self.example_privacy(ctx.engine, ctx.round))

    def summary(self, runner, rounds: int, metrics: list[dict]) -> dict[str, Any]:
        c = self.cfg
        return {"example_dp": {"delta": c.delta, "noise_multiplier": c.noise_multiplier,
                               **self.example_privacy(runner.engine, rounds)}}
