"""Adaptive server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).

With delta the round's aggregated update:
    m <- beta1 * m + (1 - beta1) * delta
    v <- beta2 * v + (1 - beta2) * delta^2                      (Adam)
    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)          (Yogi)
    v <- v + delta^2                                            (Adagrad, with beta1 = 0: m = delta)
    w <- w + lr * m / (sqrt(v) + tau)
m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2); no bias correction, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.types import Weights


def _second_moment(kind: str, v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    if kind == "adam":
        return beta2 * v + (1 - beta2) * d2
    if kind == "yogi":
        return v - (1 - beta2) * d2 * torch.sign(v - d2)
    return v + d2  # adagrad


@dataclass(frozen=True)
class Adaptive:
    """Server Adam / Yogi / Adagrad (``kind``) on the aggregated update."""

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    kind: str = "adam"
    prefixes = ("m.", "v.")

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"unknown adaptive server optimizer {self.kind!r}; valid: adam, yogi, adagrad")

    def init(self, weights: Weights) -> Weights:
        state = {f"m.{k}": torch.zeros_like(w) for k, w in weights.items()}
        state.update({f"v.{k}": torch.full_like(w, self.tau**2) for k, w in weights.items()})
        return state

    def step(self, weights: Weights, opt: Weights, delta: Weights) -> tuple[Weights, Weights]:
        beta1 = 0.0 if self.kind == "adagrad" else self.beta1
        new_opt: Weights = {}
        new: Weights = {}
        for k, d in delta.items():
            m = beta1 * opt[f"m.{k}"] + (1 - beta1) * d
            v = _second_moment(self.kind, opt[f"v.{k}"], d * d, self.beta2)
            new[k] = weights[k] + self.lr * m / (v.sqrt() + self.tau)
            new_opt[f"m.{k}"], new_opt[f"v.{k}"] = m, v
        return new, new_opt
