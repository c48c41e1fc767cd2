"""``head.loss: fedetf``: a fixed simplex-ETF classifier on normalised features (FedETF, Li et al., ICCV 2023).

The model is built with its head set to a seeded simplex equiangular tight frame (unit class vectors, pairwise
cosine -1/(C-1)) with zero bias, and frozen (``fedfm.models.load_classifier``; with ``head.calibrate: ccvr`` it stays
a trainable tensor that only CCVR's server step changes: the clients read it detached): no owner can move the head
toward its own classes, so what one-class owners train is the encoder, each pulling its features toward its class's fixed
vector. Clients train on cross-entropy of ``etf_scale`` x cos(h, m_c). The saved model is an ordinary classifier:
argmax of m_c.h is the argmax of cos(h, m_c). Nothing is revealed.
"""

from __future__ import annotations

import torch

from fedfm.features.base import ClientRound, HeadLoss
from fedfm.heads import etf_loss


class FedETF(HeadLoss):
    name = "head.loss=fedetf"
    loss_name = "fedetf"

    def client_before(self, c: ClientRound) -> None:
        head, scale = self.head, self.app.cfg.head.etf_scale

        def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            h, _ = head.features_and_logits(model, batch)
            return etf_loss(h, head.linear.weight.detach(), batch["labels"], scale)

        c.loss = loss
