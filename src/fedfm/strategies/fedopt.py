"""Adaptive server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).

With delta = mean_n(client deltas):
    m <- beta1 * m + (1 - beta1) * delta
    v <- beta2 * v + (1 - beta2) * delta^2                      (FedAdam)
    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)          (FedYogi)
    v <- v + delta^2                                            (FedAdagrad)
    w <- w + server_lr * m / (sqrt(v) + tau)
m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2); no bias correction, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.strategies.fedavg import weighted_mean
from fedfm.types import ClientUpdate, ServerState, Weights


def _second_moment(kind: str, v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    if kind == "adam":
        return beta2 * v + (1 - beta2) * d2
    if kind == "yogi":
        return v - (1 - beta2) * d2 * torch.sign(v - d2)
    return v + d2  # adagrad


@dataclass(frozen=True)
class _FedOpt:
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    kind: str = "adam"

    def init(self, weights: Weights) -> Weights:
        state = {f"m.{k}": torch.zeros_like(w) for k, w in weights.items()}
        state.update({f"v.{k}": torch.full_like(w, self.tau**2) for k, w in weights.items()})
        return state

    def client_options(self) -> dict:
        return {}

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        delta = weighted_mean(updates)
        beta1 = 0.0 if self.kind == "adagrad" else self.beta1
        opt: Weights = {}
        weights: Weights = {}
        for k, d in delta.items():
            m = beta1 * state.opt[f"m.{k}"] + (1 - beta1) * d
            v = _second_moment(self.kind, state.opt[f"v.{k}"], d * d, self.beta2)
            weights[k] = state.weights[k] + self.server_lr * m / (v.sqrt() + self.tau)
            opt[f"m.{k}"], opt[f"v.{k}"] = m, v
        return ServerState(state.round + 1, weights, opt)


@dataclass(frozen=True)
class FedAdam(_FedOpt):
    """Adaptive server Adam on the averaged delta (Reddi et al. 2021)."""

    kind: str = "adam"


@dataclass(frozen=True)
class FedYogi(_FedOpt):
    """Yogi's additive second moment on the averaged delta (Reddi et al. 2021)."""

    kind: str = "yogi"


@dataclass(frozen=True)
class FedAdagrad(_FedOpt):
    """Reddi et al.'s FedAdagrad uses no first-moment decay (beta1 = 0): m = delta."""

    kind: str = "adagrad"
