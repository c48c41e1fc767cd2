"""q-FedAvg (Li, Sanjabi, Beirami & Smith 2020, "Fair Resource Allocation in Federated Learning", Algorithm 2).

q-FFL reweights the federation toward the clients it serves worst: a client's update counts with its loss raised to
the power q. With delta_k the client's change (its model minus the global one), F_k its loss and L the Lipschitz
constant of the gradient (the paper takes L = 1 / the local learning rate), the server step is

    Delta_k = F_k^q L delta_k
    h_k     = q F_k^(q-1) L^2 ||delta_k||^2 + L F_k^q
    w      <- w + sum_k Delta_k / sum_k h_k

(the paper writes Delta w_k = L (w - w_k) = -L delta_k and subtracts). q = 0 gives the unweighted mean of the
deltas; a larger q moves the model toward the clients with the highest loss. F_k is the client's mean training loss
over its round (``train_loss``), an estimate of its loss at the global model that is closest with few local steps.
The fold keeps the two running sums, so it streams like the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedfm.aggregators.base import Aggregate, FoldContext
from fedfm.types import ClientUpdate, Weights


class QFedAvgFold:
    def __init__(self, q: float, lipschitz: float):
        self.q, self.L = q, lipschitz
        self.sum: Weights | None = None
        self.h, self.count = 0.0, 0
        self.rejected: list[dict] = []

    def add(self, update: ClientUpdate) -> None:
        loss = update.metrics.get("train_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
            self.rejected.append({"client": update.client, "reason": f"q-FedAvg needs the client's training loss, got {loss!r}"})
            return
        loss = max(float(loss), 1e-12)  # F^(q-1) of a zero loss, q < 1
        if self.sum is None:
            self.sum = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in update.delta.items()}
        sq = sum(float(t.double().pow(2).sum()) for t in update.delta.values())
        fq = loss**self.q
        for k, acc in self.sum.items():
            acc.add_(update.delta[k].float(), alpha=fq * self.L)
        self.h += (self.q * loss ** (self.q - 1) * self.L**2 * sq if self.q > 0 else 0.0) + self.L * fq
        self.count += 1

    def result(self) -> Aggregate:
        if self.sum is None or self.h <= 0:
            raise ValueError("cannot aggregate zero updates")
        return Aggregate({k: s / self.h for k, s in self.sum.items()}, float(self.count), self.count,
                         rejected=self.rejected)


@dataclass(frozen=True)
class QFedAvg:
    """q-FedAvg: each update weighed by its client's loss to the power q (fairness across owners)."""

    q: float = 1.0
    lipschitz: float = 1.0
    needs_individual_updates: ClassVar[bool] = True  # each client's loss, in the clear
    ordered: ClassVar[bool] = True

    def start(self, ctx: FoldContext | None = None) -> QFedAvgFold:
        return QFedAvgFold(self.q, self.lipschitz)
