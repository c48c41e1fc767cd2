"""``federation.max_norm_ratio``: the receive stage's norm screen (``fedfm.aggregators.screen``): updates whose L2
norm exceeds this multiple of the round's median update norm are rejected with the reason, the signature of
scaling / model-replacement attacks (Bagdasaryan et al. 2020; Sun et al. 2019)."""

from __future__ import annotations

from fedfm.aggregators.base import Aggregator
from fedfm.aggregators.screen import NormScreen
from fedfm.features.base import Feature


class NormScreening(Feature):
    name = "federation.max_norm_ratio"
    federated_only = True

    def __init__(self, app):
        self.ratio = app.cfg.federation.max_norm_ratio

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.federation.max_norm_ratio is not None

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        return NormScreen(aggregator, self.ratio)
