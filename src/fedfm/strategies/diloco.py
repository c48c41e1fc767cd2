"""DiLoCo (Douillard et al. 2023): many inner AdamW steps per client, an outer Nesterov-momentum step.

Each round the clients take ``train.local_steps`` inner steps; the server treats the negative mean
update as a pseudo-gradient ``g = -mean_n(delta)`` and applies SGD with Nesterov momentum, exactly as
``torch.optim.SGD(lr, momentum, nesterov=True)`` would:

    v <- momentum * v + g;   w <- w - lr * (g + momentum * v)

Written with ``delta = -g`` (so the stored buffer is ``-v``). The paper's outer settings are
lr=0.7, momentum=0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfm.strategies.fedavg import FedAvgM, weighted_mean
from fedfm.types import ClientUpdate, ServerState


@dataclass(frozen=True)
class DiLoCo(FedAvgM):
    """Outer SGD with Nesterov momentum on the pseudo-gradient -mean_n(delta) (same state as FedAvgM)."""

    server_lr: float = 0.7
    momentum: float = 0.9

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        delta = weighted_mean(updates)
        v = {k: self.momentum * state.opt[f"v.{k}"] + delta[k] for k in delta}
        new = {k: state.weights[k] + self.server_lr * (delta[k] + self.momentum * v[k]) for k in delta}
        return ServerState(state.round + 1, new, {f"v.{k}": t for k, t in v.items()})
