"""``train.logit_adjustment``: each client trains on logits + log p_client(y) - log p_global(y) (Menon et al. 2021;
FedLC, Zhang et al. 2022), so the shared model's logits stay calibrated to the federation's label distribution.

The federation's label counts come from what the clients report (their counts, not their examples); a shard's
offset is computed once, since its labels never change.
"""

from __future__ import annotations

import torch

from fedfm.features.base import ClientRound, Feature
from fedfm.placement import placement_of


class LogitAdjustment(Feature):
    name = "train.logit_adjustment"

    def __init__(self, app):
        self.app = app
        self._counts: torch.Tensor | None = None
        self._offsets: dict[int, torch.Tensor] = {}

    @property
    def label_counts(self) -> torch.Tensor:
        """The federation's label counts, summed from the clients' reports (read once every feature is set up: a
        simulated label-flipping attack has changed the attackers' labels by then)."""
        if self._counts is None:
            app = self.app
            self._counts = sum(torch.bincount(s.train.labels, minlength=app.task.num_labels) for s in app.client_shards)
        return self._counts

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.train.logit_adjustment and cfg.task == "classification"

    def client_before(self, c: ClientRound) -> None:
        if c.index not in self._offsets:
            labels = self.app.shards[c.index].train.labels
            self._offsets[c.index] = self.app.task.logit_offset(labels, self.label_counts)
        # on the model's device once per round, not once per step
        offset, task = self._offsets[c.index].to(placement_of(self.app.model).device), self.app.task
        c.loss = lambda model, batch: task.loss(model, batch, offset)
