"""Robust aggregation: statistics that need every client's update individually."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.strategies.fedavg import apply
from fedfm.types import ClientUpdate, ServerState, Weights


def coordinate_median(updates: list[ClientUpdate]) -> Weights:
    """Coordinate-wise median of the deltas (Yin et al. 2018); an even count averages the two middle values."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ordered = sorted(updates, key=lambda u: u.client)
    n = len(ordered)
    out: Weights = {}
    for k in ordered[0].delta:
        # sort rather than torch.median (which returns the lower middle value) or torch.quantile (size-limited)
        s = torch.stack([u.delta[k].float() for u in ordered]).sort(dim=0).values
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


@dataclass(frozen=True)
class Median:
    """w <- w + server_lr * median(delta): unweighted, tolerant of a minority of arbitrary updates."""

    server_lr: float = 1.0
    needs_individual_updates = True  # cannot run on a securely aggregated or DP-noised sum

    def init(self, weights: Weights) -> Weights:
        return {}

    def client_options(self) -> dict:
        return {}

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        return ServerState(state.round + 1, apply(state.weights, coordinate_median(updates), self.server_lr), dict(state.opt))
