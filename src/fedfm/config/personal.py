"""Personalization: each owner ends with a model of its own as well as the shared one (``fedfm.features.personal``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class PersonalConfig(Section):
    method: Literal["none", "fedper", "ditto", "finetune"] = Field(
        "none",
        description="fedper (Arivazhagan et al. 2019; FedRep's split, Collins et al. 2021): the tensors matching "
        "personal.keep (the head, or an adapter) stay at the owner, trained every round and never sent; ditto (Li et "
        "al. 2021): each owner also trains a personal copy of the trainable tensors, pulled toward the round's global "
        "model by personal.ditto_lambda / 2 x ||v - w||^2; finetune: after the last round each owner fine-tunes the "
        "final global model on its own data for personal.finetune_steps steps. Personal models are evaluated on the "
        "owners' own test splits and saved per owner under personal/<owner>/ in Hugging Face format.",
    )
    keep: list[str] = Field(
        default_factory=lambda: ["classifier", "score"],
        description="fedper: name patterns of the trainable tensors that stay at the owner (default: the "
        "classification head; ['lora_'] keeps the adapter and shares the head).",
    )
    ditto_lambda: float = Field(
        0.1, ge=0,
        description="ditto: strength of the pull toward the global model. Under AdamW the pull's gradient competes "
        "with the loss's before Adam's normalisation, so small values change little: on BBC with LoRA, 0.1 and 1 gave "
        "the local-only model's predictions exactly, 100 moved the personal model to the global one's.",
    )
    finetune_steps: int = Field(20, ge=1, description="finetune: local steps on the final global model.")
    finetune_lr: float | None = Field(None, gt=0, description="finetune: constant learning rate (None: train.lr).")

    @property
    def active(self) -> bool:
        return self.method != "none"


def check(cfg) -> None:
    p = cfg.personal
    if p.active and "federated" not in cfg.compare.methods:
        raise ValueError("personal.method personalizes a federated run: keep 'federated' in compare.methods")
    keeps_head = any(h in k for k in p.keep for h in ("classifier", "score"))  # patterns naming the head's tensors
    if p.method == "fedper" and cfg.head.loss == "fedetf" and keeps_head:
        # the owner would keep a head that never trains, and drop the one CCVR calibrates (measured: 52.7% on its
        # own split against 70.2% for local-only training, benchmarks/results/personalize_two.md)
        raise ValueError("personal.method=fedper keeps the classification head at the owner, but head.loss=fedetf "
                         "(set by recipe: label_skew) fixes that head, so the owner's copy would never train: use "
                         "personal.method=finetune (keeping the adapter, personal.keep=[lora_], is allowed but measured "
                         "below local-only training: the calibrated head expects the global adapter's features)")


def parts(cfg) -> list[Part]:
    """fedper leaves out of every update the tensors it keeps at the owner."""
    if cfg.personal.method != "fedper":
        return []
    why = "owners do not send the tensors they keep (personal.keep)"
    return [Part("personal.method=fedper", {Cap.PARTIAL_UPDATE: why}, fix="use personal.method=ditto or finetune")]
