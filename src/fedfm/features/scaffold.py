"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

Client drift under non-IID data is corrected with control variates: the server keeps c (``c.`` in its state), each
client i keeps its own c_i (in its private state). Every local step descends along g - c_i + c (the training loop
adds the correction); after the round the client's new c_i+ is its mean raw gradient and it sends, beside its model
delta dy_i, the change dc_i = c_i+ - c_i under ``control.<name>``. The server:

    x <- x + server_lr * mean_n(dy)              (example-weighted, as FedAvg; any server optimizer)
    c <- c + |S| / N * mean(dc)                   (unweighted over the |S| reporters, N clients in all)

so c stays the average of all N clients' c_i. Twice the bytes of FedAvg travel each way (x and c down, dy and dc
up). The aggregator sees only dy: this feature's fold folds dc beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedfm.aggregators.base import Aggregate, Aggregator, FoldContext, Wrapper
from fedfm.aggregators.mean import MeanFold
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.types import ClientUpdate, ServerState, Weights

CONTROL = "control."  # an update's tensors that carry the control change
PREFIX = "c."  # the server's c (ServerState.opt) and each client's c_i (its private state)


def init_control(weights: Weights) -> Weights:
    """c = 0."""
    return {PREFIX + k: torch.zeros_like(w) for k, w in weights.items()}


def control_config(opt: Weights, weights: Weights) -> dict:
    """What each client receives beside the weights: the server control variate c."""
    return {"control": {k: opt[PREFIX + k] for k in weights}}


def control_step(opt: Weights, weights: Weights, dc: Weights, reporters: int, num_clients: int) -> Weights:
    """c <- c + |S| / N * mean(dc)."""
    share = reporters / max(num_clients, reporters)
    return {PREFIX + k: opt[PREFIX + k] + share * dc[k] for k in weights}


class _ScaffoldFold:
    """Folds the model delta into the aggregator's fold and the control change into its own unweighted mean."""

    def __init__(self, inner, ctx: FoldContext, num_clients: int):
        self.inner, self.ctx, self.num_clients = inner, ctx, num_clients
        self.controls = MeanFold(weighted=False, expected=float(len(ctx.members)))

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, update: ClientUpdate) -> None:
        ref = self.ctx.reference
        self.inner.add(replace(update, delta={k: update.delta[k] for k in ref}))
        self.controls.add(replace(update, delta={k: update.delta[CONTROL + k] for k in ref}))

    def result(self) -> Aggregate:
        agg = self.inner.result()
        dc = self.controls.result().delta
        agg.opt.update(control_step(self.ctx.state.opt, self.ctx.reference, dc, agg.count, self.num_clients))
        return agg


@dataclass(frozen=True)
class WithControl(Wrapper):
    """``inner`` on the model deltas, and SCAFFOLD's server control variate updated beside it."""

    num_clients: int

    def start(self, ctx: FoldContext) -> _ScaffoldFold:
        return _ScaffoldFold(self.inner.start(ctx), ctx, self.num_clients)


class Scaffold(Feature):
    name = "strategy.name=scaffold"
    prefixes = (PREFIX,)
    federated_only = True

    def __init__(self, app):
        self.num_clients = len(app.split.client_names)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.strategy.name == "scaffold"

    def init_state(self, weights: Weights) -> Weights:
        return init_control(weights)

    def configure(self, ctx: RoundContext, group, state: ServerState, members: list[int]) -> dict:
        return control_config(state.opt, state.weights)

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        return WithControl(aggregator, self.num_clients)

    def expected(self, layout: Weights | None) -> Weights | None:
        return None if layout is None else {**layout, **{CONTROL + k: w for k, w in layout.items()}}

    def client_before(self, c: ClientRound) -> None:
        if "control" in c.task.config:  # the baselines train without control variates
            server_c = c.task.config["control"]
            c.control = (server_c, {k: c.state.get(PREFIX + k, torch.zeros_like(v)) for k, v in server_c.items()})

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        if c.control is None:
            return update
        new_c = update.control
        update.delta.update({CONTROL + k: new_c[k] - c.control[1][k] for k in new_c})
        c.new_state.update({PREFIX + k: v for k, v in new_c.items()})
        update.control = None
        return update
