"""``strategy.lora_aggregation``: how a round's LoRA factors are combined (``fedfm.lora`` explains why it matters).

'separate' keeps the aggregator (each factor averaged on its own) and reports how far mean(B) mean(A) is from
mean(B A) every round; 'exact' and 'flexlora' average the products and re-factorise by SVD; 'hetlora' averages
each rank component over the clients that hold it.
"""

from __future__ import annotations

from fedfm.aggregators.base import Aggregator
from fedfm.aggregators.lora import HetLora, LoraExact, WithProductGap
from fedfm.features.base import Feature


class LoraAggregation(Feature):
    name = "strategy.lora_aggregation"
    federated_only = True

    def __init__(self, app):
        self.mode, self.pairs = app.cfg.strategy.lora_aggregation, app.lora_pairs

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.peft.method == "lora"

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        if not self.pairs:
            return aggregator
        if self.mode == "separate":
            return WithProductGap(aggregator, frozenset(k for pair in self.pairs.values() for k in pair))
        if self.mode == "hetlora":
            return HetLora()
        return LoraExact(heterogeneous=self.mode == "flexlora")
