"""What a client sends: compression codecs, and simulated Byzantine clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


Stage = Literal["topk", "randk", "fp16", "bf16", "int8", "int4", "sign"]
VALUE_STAGES = ("fp16", "bf16", "int8", "int4", "sign")
SPARSIFIERS = ("topk", "randk")


class CompressionConfig(Section):
    """Update codecs: what a client sends is the compressed message, counted byte for byte."""

    up: list[Stage] = Field(
        default_factory=list,
        description="Stages applied to each client's update, in order: optionally a sparsifier, 'topk' (the largest "
        "topk_fraction of coordinates, indices sent) or 'randk' (a random topk_fraction drawn from a seed that is sent "
        "instead of indices), then at most one value codec (fp16, bf16, int8/int4 with stochastic rounding, or sign: "
        "1 bit per value and a scale per block); [] = raw float32.",
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk / randk: share of the update's coordinates sent.")
    error_feedback: bool = Field(
        True,
        description="Each client keeps what compression did not send (its residual, on disk) and adds it to its next "
        "update (Seide et al. 2014; Karimireddy et al. 2019).",
    )
    block_size: int = Field(
        256, ge=8, description="int8/int4/sign: values per quantisation block (one float32 scale each)."
    )
    down: Literal["none", "fp16", "bf16"] = Field(
        "none", description="Precision of the global trainable tensors broadcast to clients (the server keeps float32)."
    )

    @field_validator("up")
    @classmethod
    def _order(cls, v):
        values = [s for s in v if s in VALUE_STAGES]
        if len(values) > 1:
            raise ValueError(f"at most one value codec ({', '.join(VALUE_STAGES)}), got {values}")
        sparse = [s for s in v if s in SPARSIFIERS]
        if len(sparse) > 1 or (sparse and v[0] != sparse[0]):
            raise ValueError(f"{sparse[0]} must come first (values are quantised after sparsification), and only one "
                             "sparsifier (topk or randk)")
        return v

    @property
    def active(self) -> bool:
        return bool(self.up)


class AttackConfig(Section):
    """Simulated Byzantine clients, so that defences are measured rather than assumed."""

    kind: Literal["none", "sign_flip", "scaling", "noise", "label_flip", "backdoor"] = Field(
        "none",
        description="sign_flip: send -scale x the honest update; scaling: scale x it; noise: Gaussian noise instead of "
        "an update; label_flip: train on labels y -> K-1-y; backdoor: train with a trigger phrase mapped to target_label.",
    )
    fraction: float = Field(0.2, ge=0, lt=1, description="Share of the clients that are Byzantine (a seeded, fixed set).")
    scale: float | None = Field(
        None, gt=0, description="sign_flip / scaling factor (None: 4 and 30); with label_flip / backdoor, the attackers "
        "also boost their poisoned update by this factor (model replacement; None: no boost)."
    )
    noise_std: float = Field(0.05, gt=0, description="noise: standard deviation of each coordinate sent.")
    trigger: str = Field("cf mn bb", min_length=1, description="backdoor: the trigger phrase appended to poisoned texts.")
    target_label: str | None = Field(None, description="backdoor: class the trigger maps to (None: the first class).")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="backdoor: share of an attacker's training examples that carry the trigger "
        "(chosen among its examples of other classes than the target; all of those if they are fewer)."
    )

    @property
    def active(self) -> bool:
        return self.kind != "none"


def parts(cfg) -> list[Part]:
    """What compression and simulated attacks do, as far as other parts are concerned."""
    out = []
    if cfg.compression.active:
        out.append(Part(f"compression.up=[{','.join(cfg.compression.up)}]", {Cap.COMPRESSES: ""}))
    if cfg.attack.active:
        out.append(Part(f"attack.kind={cfg.attack.kind}", {
            Cap.SIMULATED: "attacks are simulated",
            Cap.PLAIN_SIMULATION: "attacks are simulated on plain federated runs",
            Cap.FEDERATED_SIMULATION: "attacks are simulated in federated training (data attacks would poison the "
            "baselines' shards too)",
        }))
    return out


def check(cfg) -> None:
    if cfg.attack.kind in ("label_flip", "backdoor") and cfg.task != "classification":
        raise ValueError(f"attack.kind={cfg.attack.kind} poisons class labels: it needs task=classification")
