"""``head.loss: fedrs``: restricted softmax (FedRS, Li & Zhan, KDD 2021).

A client that holds only some classes trains on logits where each class it lacks scores ``fedrs_alpha`` x w_c.h
(+ b_c): the vectors of the missing classes are pushed away from its features less hard, so one owner's update does
not wipe out what the others taught about their classes. The client needs only its own label set: nothing is
revealed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedfm.features.base import ClientRound, HeadLoss
from fedfm.heads import restricted_logits


class FedRS(HeadLoss):
    name = "head.loss=fedrs"
    loss_name = "fedrs"

    def client_before(self, c: ClientRound) -> None:
        present = torch.bincount(c.data.labels, minlength=self.app.task.num_labels) > 0
        alpha, head = self.app.cfg.head.fedrs_alpha, self.head.linear

        def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            bias = head.bias.float() if head.bias is not None else None
            return F.cross_entropy(restricted_logits(logits, bias, present.to(logits.device), alpha), batch["labels"])

        c.loss = loss
