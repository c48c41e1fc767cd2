"""``head.loss: fedaws``: federated averaging with spreadout (FedAwS, Yu et al., ICML 2020).

Each client trains on its positives only: every feature is pulled toward its own class vector (max(0, margin -
cos(h, w_y))^2), and no other class's vector enters its loss, so a one-class owner cannot collapse the head toward its
class. After each round the server takes gradient steps on the spreadout term, which pushes the class vectors apart,
and keeps the head's rows unit length. Nothing is revealed: the server acts on the aggregated head alone.
"""

from __future__ import annotations

import math

import torch

from fedfm.features.base import ClientRound, HeadLoss, RoundContext
from fedfm.heads import positive_loss, spread_out
from fedfm.types import ServerState


class FedAwS(HeadLoss):
    name = "head.loss=fedaws"
    loss_name = "fedaws"

    def client_before(self, c: ClientRound) -> None:
        head, margin = self.head, self.app.cfg.head.aws_margin

        def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            h, _ = head.features_and_logits(model, batch)
            return positive_loss(h, head.linear.weight, batch["labels"], margin)

        c.loss = loss

    def step(self, ctx: RoundContext, group, state: ServerState, agg) -> ServerState:
        h, name = self.app.cfg.head, self.head.weight_name
        if not name:
            return state
        c = self.app.task.num_labels
        margin = h.spreadout_margin if h.spreadout_margin is not None else math.sqrt(2 * c / (c - 1))
        weights = {**state.weights, name: spread_out(state.weights[name], margin, h.spreadout_steps, h.spreadout_lr)}
        return ServerState(state.round, weights, state.opt)
