"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

Client drift under non-IID data is corrected with control variates: the server keeps c, each client i keeps
its own c_i (at the client, on disk in simulation: ``fedfm.store.ClientStates``). Every local step descends
along g - c_i + c (``fedfm.client``); after the round the client's new c_i+ is its mean raw gradient and it
sends, beside its model delta dy_i, the change dc_i = c_i+ - c_i under ``control.<name>``. The server:

    x <- x + server_lr * mean_n(dy)              (example-weighted, as FedAvg)
    c <- c + |S| / N * mean(dc)                   (unweighted over the |S| reporters, N clients in all)

so c stays the average of all N clients' c_i. Twice the bytes of FedAvg travel each way (x and c down, dy and
dc up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.strategies.fedavg import apply, weighted_mean
from fedfm.types import ClientUpdate, ServerState, Weights

CONTROL = "control."


@dataclass(frozen=True)
class Scaffold:
    """Control variates against client drift: x <- x + server_lr * mean(dy); c <- c + |S|/N mean(dc)."""

    server_lr: float = 1.0
    num_clients: int = 1  # N: set by the round loop from the federation's size

    def init(self, weights: Weights) -> Weights:
        return {f"c.{k}": torch.zeros_like(w) for k, w in weights.items()}

    def client_options(self) -> dict:
        return {}

    def task_config(self, state: ServerState) -> dict:
        """What each client receives beside the weights: the server control variate c."""
        return {"control": {k: state.opt[f"c.{k}"] for k in state.weights}}

    def extra_keys(self, weights: Weights) -> Weights:
        """Tensors a client's update carries beside the model delta (for validation): the control change."""
        return {CONTROL + k: w for k, w in weights.items()}

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        model = [ClientUpdate(u.client, {k: u.delta[k] for k in state.weights}, u.num_examples) for u in updates]
        ctrl = [ClientUpdate(u.client, {k: u.delta[CONTROL + k] for k in state.weights}, 1.0) for u in updates]
        dy, dc = weighted_mean(model), weighted_mean(ctrl)
        share = len(updates) / max(self.num_clients, len(updates))
        opt = {f"c.{k}": state.opt[f"c.{k}"] + share * dc[k] for k in state.weights}
        return ServerState(state.round + 1, apply(state.weights, dy, self.server_lr), opt)
