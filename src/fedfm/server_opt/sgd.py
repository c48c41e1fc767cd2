"""Server SGD, with heavy-ball momentum (FedAvgM, Hsu et al. 2019) or Nesterov momentum (DiLoCo's outer step).

A server optimizer takes the round's aggregated update ``delta`` (the mean client change, i.e. minus a
pseudo-gradient) and the global weights, and returns the new weights and its own state (kept in
``ServerState.opt`` under its keys, checkpointed with it). Each is a pure function of that state.

    SGD:       w <- w + lr * delta                                     (lr = 1: McMahan et al.'s FedAvg)
    Momentum:  v <- momentum * v + delta;  w <- w + lr * v
    Nesterov:  v <- momentum * v + delta;  w <- w + lr * (delta + momentum * v)

Nesterov is ``torch.optim.SGD(lr, momentum, nesterov=True)`` on the pseudo-gradient ``g = -delta``, written with
``delta = -g`` (so the stored buffer is ``-v``); DiLoCo (Douillard et al. 2023) uses lr 0.7, momentum 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.types import Weights


def apply(weights: Weights, step: Weights, lr: float) -> Weights:
    """weights + lr * step, as new tensors."""
    return {k: weights[k] + lr * step[k] for k in weights}


@dataclass(frozen=True)
class SGD:
    """w <- w + lr * delta."""

    lr: float = 1.0
    prefixes = ()  # keeps no state

    def init(self, weights: Weights) -> Weights:
        return {}

    def step(self, weights: Weights, opt: Weights, delta: Weights) -> tuple[Weights, Weights]:
        return apply(weights, delta, self.lr), {}


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball server momentum: v <- momentum * v + delta; w <- w + lr * v."""

    lr: float = 1.0
    momentum: float = 0.9
    prefixes = ("v.",)

    def init(self, weights: Weights) -> Weights:
        return {f"v.{k}": torch.zeros_like(w) for k, w in weights.items()}

    def step(self, weights: Weights, opt: Weights, delta: Weights) -> tuple[Weights, Weights]:
        v = {k: self.momentum * opt[f"v.{k}"] + delta[k] for k in delta}
        return apply(weights, v, self.lr), {f"v.{k}": t for k, t in v.items()}


@dataclass(frozen=True)
class Nesterov(Momentum):
    """Nesterov server momentum on the pseudo-gradient (DiLoCo's outer optimizer)."""

    lr: float = 0.7

    def step(self, weights: Weights, opt: Weights, delta: Weights) -> tuple[Weights, Weights]:
        v = {k: self.momentum * opt[f"v.{k}"] + delta[k] for k in delta}
        new = {k: weights[k] + self.lr * (delta[k] + self.momentum * v[k]) for k in delta}
        return new, {f"v.{k}": t for k, t in v.items()}
