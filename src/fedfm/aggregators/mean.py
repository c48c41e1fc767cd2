"""The example-weighted mean (FedAvg's aggregator, McMahan et al. 2017), folded in as updates arrive.

The fold keeps the running sum ``S = sum_i (n_i / N) * delta_i`` and ``sum_i n_i``: a round holds one client update
at a time, whatever the number of clients. ``N`` is the total the round expects (the sampled clients' example
counts, known before any update arrives), so when every client reports, the result is ``S`` itself, bit for bit
the divide-first mean fedfm always computed; when some do not, ``S`` is rescaled by ``N / sum_i n_i`` once at the
end. Added in client order, so the same seed gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedfm.aggregators.base import Aggregate, FoldContext
from fedfm.types import ClientUpdate, Weights


class MeanFold:
    """Running sums of one round: ``sum_i n_i delta_i`` per tensor, ``sum_i n_i``, and the count."""

    def __init__(self, weighted: bool = True, expected: float | None = None):
        self.weighted = weighted  # False: every update weighs 1 (DP's clipped updates, SCAFFOLD's control changes)
        self.expected = expected if expected else 1.0  # N; None: sum n_i delta_i, divided at the end
        self.sum: Weights | None = None
        self.weight, self.count = 0.0, 0

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_examples) if self.weighted else 1.0
        if self.sum is None:
            self.sum = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in update.delta.items()}
        for k, acc in self.sum.items():
            acc.add_(update.delta[k].float(), alpha=w / self.expected)
        self.weight += w
        self.count += 1

    def result(self) -> Aggregate:
        if self.sum is None:
            raise ValueError("cannot aggregate zero updates")
        scale = self.expected / self.weight
        delta = self.sum if scale == 1.0 else {k: s * scale for k, s in self.sum.items()}
        return Aggregate(delta, self.weight, self.count)


@dataclass(frozen=True)
class Mean:
    """Example-weighted mean of the round's deltas: ``sum_i n_i delta_i / sum_i n_i``."""

    needs_individual_updates: ClassVar[bool] = False
    ordered: ClassVar[bool] = True

    def start(self, ctx: FoldContext | None = None) -> MeanFold:
        return MeanFold(expected=ctx.expected_weight if ctx else None)


def weighted_mean(updates: list[ClientUpdate]) -> Weights:
    """Example-weighted mean of a list of updates, added in client-name order (independent of the list's order)."""
    fold = MeanFold(expected=sum(float(u.num_examples) for u in updates))
    for u in sorted(updates, key=lambda u: u.client):
        fold.add(u)
    return fold.result().delta
