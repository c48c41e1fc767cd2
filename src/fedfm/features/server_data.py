"""Algorithm 2 of the FFM paper (``server_data``): the server holds some data and trains on it every round.

'before': the server trains from the round's global model and its update joins the clients' aggregate as a
pseudo-client whose share of the averaged update is exactly ``share``; 'after': the clients are aggregated and
stepped first, then the server trains from the result and ``share`` x its update is added. ``share`` is
``server_data.weight``, or n_server / (n_server + n_clients) when unset (n_clients: the aggregate's weight, the
clients' examples; the number of reporters under DP). The server's data never enters an engine or leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedfm.aggregators.base import Aggregate, Aggregator, FoldContext, Wrapper
from fedfm.features.base import Feature, RoundContext
from fedfm.server_opt.sgd import apply
from fedfm.types import ClientTask, ClientUpdate, ServerState


def with_server(updates: list[ClientUpdate], server: ClientUpdate, share: float) -> list[ClientUpdate]:
    """The updates to aggregate when the server's own update must make up ``share`` of the weighted mean.

    With client weights n_i summing to N, a pseudo-client weight w_s = share / (1 - share) * N gives
    w_s / (w_s + N) = share; share 0 drops the server update and share 1 keeps only it.
    """
    if share <= 0:
        return list(updates)
    if share >= 1:
        return [server]
    total = float(sum(u.num_examples for u in updates))
    return [*updates, replace(server, num_examples=share / (1.0 - share) * total)]


class _BeforeFold:
    def __init__(self, inner, ctx: FoldContext, feature: ServerData):
        self.inner, self.ctx, self.feature = inner, ctx, feature

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, update: ClientUpdate) -> None:
        self.inner.add(update)

    def result(self) -> Aggregate:
        agg = self.inner.result()
        su, share = self.feature.train(self.ctx.round, self.ctx.reference, agg.weight)
        # the weighted mean over the clients' aggregate and the pseudo-client (with_server), in closed form
        if share >= 1:
            agg.delta = dict(su.delta)
        elif share > 0:
            agg.delta = {k: (1.0 - share) * d + share * su.delta[k] for k, d in agg.delta.items()}
        agg.info.update(server_share=share, server_loss=su.metrics["train_loss"])
        return agg


@dataclass(frozen=True)
class _Before(Wrapper):
    feature: ServerData

    def start(self, ctx: FoldContext) -> _BeforeFold:
        return _BeforeFold(self.inner.start(ctx), ctx, self.feature)


class ServerData(Feature):
    name = "server_data"
    federated_only = True

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg.server_data

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.server_data.active and cfg.server_data.steps > 0

    def train(self, round_: int, weights, n_clients: float) -> tuple[ClientUpdate, float]:
        """The server's own update from ``weights``, and its share of the round's update."""
        app = self.app
        n_server = len(app.shards[app.server_index].train)
        share = self.cfg.weight if self.cfg.weight is not None else n_server / (n_server + n_clients)
        budget = self.cfg.steps * app.cfg.train.batch_size
        return app.client_train(app.server_index, ClientTask(round_, weights, budget)), share

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        return _Before(aggregator, self) if self.cfg.when == "before" else aggregator

    def step(self, ctx: RoundContext, group, state: ServerState, agg: Aggregate) -> ServerState:
        if self.cfg.when != "after":
            return state
        su, share = self.train(ctx.round, state.weights, agg.weight)
        ctx.record.update(server_share=share, server_loss=su.metrics["train_loss"])
        return ServerState(state.round, apply(state.weights, su.delta, share), state.opt)
