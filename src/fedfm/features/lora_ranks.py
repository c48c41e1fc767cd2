"""Heterogeneous LoRA ranks (``federation.lora_ranks``): each client's device affords one rank r_i <= r (seeded,
balanced); it trains and sends only its first r_i components (HetLoRA, Cho et al. 2024; FlexLoRA, Bai et al. 2024).

At the client the global adapter is truncated to r_i components and the others' gradients masked; what it sends
is packed to its rank. At the server the packed update is zero-padded back and its rank noted for the aggregator
(``strategy.lora_aggregation`` hetlora or flexlora; ``fedfm.lora`` has the mathematics).
"""

from __future__ import annotations

from dataclasses import replace

from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.lora import assign_ranks, pack_rank, rank_gradient_mask, truncate_rank, unpack_rank
from fedfm.models import trainable_params
from fedfm.types import ClientUpdate, Weights


class LoraRanks(Feature):
    name = "federation.lora_ranks"

    def __init__(self, app):
        self.app, self.pairs = app, app.lora_pairs
        self.ranks: list[int] = assign_ranks(len(app.split.client_names), app.cfg.federation.lora_ranks, app.cfg.seed)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.federation.lora_ranks is not None

    def rank(self, index: int) -> int | None:
        """The rank client ``index`` can afford (None: the adapter's full rank; the baselines' participants)."""
        return self.ranks[index] if index < len(self.ranks) else None

    def client_before(self, c: ClientRound) -> None:
        rank = self.rank(c.index)
        if rank is None:
            return
        c.task = replace(c.task, weights=truncate_rank(c.task.weights, self.pairs, rank))
        for hook in rank_gradient_mask(trainable_params(self.app.model), self.pairs, rank):
            c.cleanups.append(hook.remove)

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        rank = self.rank(c.index)
        return update if rank is None else replace(update, delta=pack_rank(update.delta, self.pairs, rank))

    def decode(self, ctx: RoundContext, update: ClientUpdate, reference: Weights) -> str | None:
        try:
            update.delta, rank = unpack_rank(update.delta, reference, self.pairs)
        except ValueError as exc:
            return f"malformed LoRA update: {exc}"
        update.metrics["lora_rank"] = rank
        return None
