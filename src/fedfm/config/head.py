"""Classification under label skew: how owners train the classification head, and whether the server re-calibrates
it (``fedfm.heads``; the methods compared in benchmarks/label_skew.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class HeadConfig(Section):
    loss: Literal["ce", "fedrs", "fedaws", "fedetf"] = Field(
        "ce",
        description="The clients' classification loss: ce (cross-entropy); fedrs (restricted softmax, Li & Zhan 2021: "
        "a class the client lacks scores head.fedrs_alpha x its logit); fedaws (positives only, Yu et al. 2020: "
        "each feature is pulled toward its own class vector, and the server spreads the class vectors apart); fedetf "
        "(Li et al. 2023: a fixed simplex-ETF head on normalised features; never trained by the clients, and not sent "
        "unless CCVR calibrates it at the end).",
    )
    fedrs_alpha: float = Field(0.5, ge=0, le=1, description="fedrs: the scale of an absent class's logit.")
    etf_scale: float = Field(
        10.0, gt=0, description="fedetf: the logits are etf_scale x cos(h, class vector) (1 / the temperature)."
    )
    aws_margin: float = Field(0.9, gt=-1, le=1, description="fedaws: the positive loss is max(0, margin - cos(h, w_y))^2.")
    spreadout_margin: float | None = Field(
        None, gt=0, le=2, description="fedaws: class vectors closer than this (unit rows) are pushed apart (None: the "
        "distance of a simplex ETF, sqrt(2C/(C-1)), the furthest C unit vectors can all be from each other).",
    )
    spreadout_steps: int = Field(10, ge=0, description="fedaws: server gradient steps on the spreadout term per round.")
    spreadout_lr: float = Field(0.1, gt=0, description="fedaws: the server's step size on the spreadout term.")
    calibrate: Literal["none", "ccvr"] = Field(
        "none",
        description="ccvr (Luo et al. 2021): after the last round every owner sends the per-class mean and covariance "
        "of its features under the global model; the server retrains the head on features sampled from them.",
    )
    ccvr_samples: int = Field(200, ge=2, description="ccvr: virtual features drawn per class.")
    ccvr_steps: int = Field(300, ge=1, description="ccvr: full-batch Adam steps on the virtual features.")
    ccvr_lr: float = Field(0.01, gt=0, description="ccvr: Adam's step size.")

    @property
    def active(self) -> bool:
        return self.loss != "ce" or self.calibrate != "none"


def check(cfg) -> None:
    h = cfg.head
    if h.active and cfg.task != "classification":
        raise ValueError("head.loss and head.calibrate concern a classification head: set task=classification")


def parts(cfg) -> list[Part]:
    """What the head methods do, as far as other parts are concerned."""
    h, out = cfg.head, []
    replaces = "it replaces the classification loss"
    if h.loss != "ce":
        caps = {Cap.REPLACES_LOSS: replaces}
        if h.loss == "fedaws":
            caps[Cap.NON_EXAMPLE_GRADIENT] = "its positive loss reads the head's weights outside the head module, where " \
                                             "per-example gradients are not computed"
        out.append(Part(f"head.loss={h.loss}", caps, fix="set head.loss=ce"))
    if h.calibrate == "ccvr":
        out.append(Part("head.calibrate=ccvr", {
            Cap.CLEAR_TENSORS: "owners send each class's feature mean and covariance in the clear",
        }, fix="set head.calibrate=none for private runs"))
    return out
