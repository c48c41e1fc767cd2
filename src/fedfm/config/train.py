"""The one client training loop's settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class TrainConfig(Section):
    local_epochs: float | None = Field(1.0, gt=0, description="Local passes over the shard per round.")
    local_steps: int | None = Field(
        None, ge=1, description="Fixed local optimiser steps per round (overrides local_epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Local mini-batch size.")
    lr: float = Field(5e-4, gt=0, description="Peak client learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(
        (0.9, 0.999),
        description="AdamW's (beta1, beta2); language-model pre-training usually takes (0.9, 0.95) (nanoGPT, litgpt).",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (None = off).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="LR schedule over the whole run (continues across rounds)."
    )
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the run spent in linear warm-up.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where the base model and the batches live: auto (CUDA when torch sees a GPU, else the CPU; each "
        "process decides on its own machine), cpu, cuda, cuda:N. Updates leave it once per round, as float32.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast forward passes to bf16 (CPU and CUDA) or fp16 (CUDA, with a GradScaler); the weights "
        "keep model.dtype.",
    )
    micro_batch_size: int | None = Field(
        None, ge=1,
        description="Gradient accumulation: each batch of train.batch_size runs as micro-batches of this many "
        "examples, each loss weighted by its share of the batch's loss terms, so the step equals the full batch's.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them (transformers' gradient "
        "checkpointing, non-reentrant): less memory, about a third more compute.",
    )
    keep_optimizer_state: bool = Field(
        False,
        description="Each client keeps its AdamW moments and step count from one round to the next (on its own "
        "machine, with its other private state) instead of starting a fresh AdamW every round, as DiLoCo's workers "
        "do (Douillard et al. 2023). The state stays at the client and is never sent.",
    )
    logit_adjustment: bool = Field(
        False,
        description="Classification under label skew: each client trains on logits + log p_client(y) - log p_global(y) "
        "(logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022), so the shared model's logits stay calibrated "
        "to the federation's label distribution (clients report label counts, not examples).",
    )


def parts(cfg) -> list[Part]:
    """What the training loop's switches do, as far as other parts are concerned."""
    out = []
    if cfg.train.logit_adjustment:
        out.append(Part("train.logit_adjustment", {
            Cap.CLEAR_TENSORS: "clients reveal their label counts in the clear",
            Cap.COUPLED_EXAMPLES: "clients reveal their label counts, and each example's loss would depend on the "
            "other examples' labels",
            Cap.LABEL_PRIOR: "", Cap.SIMULATED: "it needs every owner's label counts",
            Cap.REPLACES_LOSS: "it replaces the classification loss",
        }, fix="turn it off for private runs"))
    if cfg.train.micro_batch_size is not None and cfg.train.micro_batch_size < cfg.train.batch_size:
        out.append(Part("train.micro_batch_size", {Cap.SPLITS_BATCHES: ""}))
    if cfg.train.keep_optimizer_state:
        out.append(Part("train.keep_optimizer_state", {Cap.STATEFUL_CLIENT_OPT: ""}))
    return out
