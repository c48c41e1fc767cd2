"""Who takes part each round, and the faults a simulation gives them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class FederationConfig(Section):
    num_clients: int | None = Field(
        10, ge=1, description="Number of clients (None with partition=natural: one per key)."
    )
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of clients sampled each round.")
    min_clients: int = Field(
        1, ge=1, description="Minimum clients sampled each round, and the fewest valid updates a round completes with."
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': exactly round(fraction x clients) sampled without replacement; 'poisson': each client "
        "independently with probability fraction (the sampling DP-FedAvg's amplification assumes).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Simulated faults: probability that a sampled client vanishes after receiving its task "
        "(after the key exchange under secure aggregation); seeded, so runs stay reproducible.",
    )
    deadline: float | None = Field(
        None,
        gt=0,
        description="Round deadline in simulated seconds: a client's round takes steps x step_seconds x its slowness, "
        "and clients past the deadline are stragglers whose updates are excluded (and logged); the round completes "
        "with those that reported if they are at least min_clients. None = wait for everyone.",
    )
    step_seconds: float = Field(1.0, gt=0, description="Simulated seconds per local step of a client of slowness 1.")
    slowness_spread: float = Field(
        0.0,
        ge=0,
        description="Client slowness is exp(s * z), z ~ N(0,1) drawn per client (its device) plus half as much per "
        "round (its load), seeded: 0 = identical clients. 0.5 makes about 1 in 6 clients 1.6x slower than typical.",
    )
    max_norm_ratio: float | None = Field(
        None,
        gt=1,
        description="Update validation: reject an update whose L2 norm exceeds this multiple of the round's median "
        "update norm (logged with the reason; None = no norm screening).",
    )
    lora_ranks: list[int] | None = Field(
        None,
        min_length=1,
        description="Heterogeneous LoRA ranks: each client gets one of these ranks (seeded, balanced), at most the "
        "adapter's peft rank; it trains and sends only its first r components (HetLoRA/FlexLoRA). None = all clients "
        "use the full rank.",
    )


def parts(cfg) -> list[Part]:
    """What the federation section switches on, as far as other parts are concerned."""
    f, out = cfg.federation, []
    if f.lora_ranks is not None:
        out.append(Part("federation.lora_ranks", {
            Cap.OWN_RANK: "each client sends only its own rank's components, which compression, dp and secagg do not "
            "know of"}))
    if f.max_norm_ratio is not None:
        out.append(Part("federation.max_norm_ratio", {Cap.EACH_UPDATE: "it screens each update's norm"},
                        fix="DP-FedAvg bounds every update by clipping (dp.clip_norm) and secure aggregation hides "
                        "individual norms: unset it"))
    if f.dropout > 0:
        out.append(Part("federation.dropout", {Cap.SIMULATED: "real nodes vanish on their own"}))
    if f.deadline is not None:
        out.append(Part("federation.deadline", {Cap.SIMULATED: "straggler times are simulated",
                                                Cap.PLAIN_SIMULATION: "use federation.dropout to simulate clients "
                                                "that vanish"}))
    return out


def check(cfg) -> None:
    """What heterogeneous LoRA ranks need of the rest of the config."""
    ranks = cfg.federation.lora_ranks
    if ranks is None:
        return
    rank = int(cfg.peft.options.get("r", 8))
    if cfg.peft.method != "lora":
        raise ValueError("federation.lora_ranks needs peft.method=lora")
    if max(ranks) > rank or min(ranks) < 1:
        raise ValueError(f"federation.lora_ranks must lie in 1..{rank} (peft.options.r)")
    if cfg.strategy.lora_aggregation in ("separate", "exact"):
        raise ValueError("federation.lora_ranks (heterogeneous ranks) needs strategy.lora_aggregation=hetlora or flexlora")
