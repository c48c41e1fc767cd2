"""FedAvg (McMahan et al. 2017), FedProx (Li et al. 2020) and FedAvgM (Hsu et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.types import ClientUpdate, ServerState, Weights


def weighted_mean(updates: list[ClientUpdate]) -> Weights:
    """Example-weighted mean of the clients' deltas: sum_i n_i * delta_i / sum_i n_i.

    Summed in client-name order so the result does not depend on the order an engine returned them.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ordered = sorted(updates, key=lambda u: u.client)
    total = float(sum(u.num_examples for u in ordered))
    out: Weights = {}
    for name in ordered[0].delta:
        acc = torch.zeros_like(ordered[0].delta[name], dtype=torch.float32)
        for u in ordered:
            acc.add_(u.delta[name].float(), alpha=u.num_examples / total)
        out[name] = acc
    return out


def apply(weights: Weights, step: Weights, lr: float) -> Weights:
    """weights + lr * step, as new tensors."""
    return {k: weights[k] + lr * step[k] for k in weights}


@dataclass(frozen=True)
class FedAvg:
    """w <- w + server_lr * mean_n(delta). server_lr=1 is McMahan et al.'s FedAvg."""

    server_lr: float = 1.0

    def init(self, weights: Weights) -> Weights:
        return {}

    def client_options(self) -> dict:
        return {}

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        return ServerState(state.round + 1, apply(state.weights, weighted_mean(updates), self.server_lr), dict(state.opt))


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg aggregation; clients add (mu/2)||w - w_global||^2 to their loss (see fedfm.client)."""

    prox_mu: float = 0.01

    def client_options(self) -> dict:
        return {"prox_mu": self.prox_mu}


@dataclass(frozen=True)
class FedAvgM:
    """Server momentum: v <- momentum * v + mean_n(delta); w <- w + server_lr * v."""

    server_lr: float = 1.0
    momentum: float = 0.9

    def init(self, weights: Weights) -> Weights:
        return {f"v.{k}": torch.zeros_like(w) for k, w in weights.items()}

    def client_options(self) -> dict:
        return {}

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        delta = weighted_mean(updates)
        v = {k: self.momentum * state.opt[f"v.{k}"] + delta[k] for k in delta}
        return ServerState(state.round + 1, apply(state.weights, v, self.server_lr), {f"v.{k}": t for k, t in v.items()})
