"""How a round's updates become the next global model: a named strategy, or an aggregator and a server optimizer."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


StrategyName = Literal[
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco", "scaffold", "median", "trimmed_mean",
    "krum", "normbound",
]
STRATEGY_NAMES = get_args(StrategyName)
ROBUST = ("median", "trimmed_mean", "krum", "normbound")  # aggregators that need each client's update
# the server optimizer of each named strategy (fedfm.strategies); these keep state across rounds
PRESET_OPTIMIZER = {"fedavgm": "momentum", "diloco": "nesterov", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
STATEFUL_OPTIMIZERS = ("momentum", "nesterov", "adam", "yogi", "adagrad")
# what each aggregator other than the mean does, for compatibility messages
AGGREGATOR_KINDS = {**{name: "a robust statistic" for name in ROBUST}, "qfedavg": "q-FedAvg's loss-weighted mean"}


class StrategyConfig(Section):
    name: StrategyName = Field(
        "fedavg",
        description="Server aggregation / optimiser. Robust (Byzantine-tolerant) aggregators: median, trimmed_mean, "
        "krum (Krum / Multi-Krum), normbound; scaffold: control variates at every client (Karimireddy et al. 2020).",
    )
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "normbound", "qfedavg"] | None = Field(
        None,
        description="How a round's updates are combined, overriding the one of strategy.name (None): the "
        "example-weighted mean, or a robust statistic (e.g. median with server_opt=momentum).",
    )
    server_opt: Literal["sgd", "momentum", "nesterov", "adam", "yogi", "adagrad"] | None = Field(
        None,
        description="How the combined update moves the global model, overriding the one of strategy.name (None): "
        "SGD with server_lr, heavy-ball momentum (FedAvgM), Nesterov (DiLoCo), Adam/Yogi/Adagrad (Reddi et al. 2021).",
    )
    server_lr: float = Field(1.0, gt=0, description="Server learning rate (eta) applied to the averaged update.")
    momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM / DiLoCo (Nesterov) outer momentum.")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity (epsilon) tau.")
    prox_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu.")
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share of the largest and of the smallest values dropped per coordinate."
    )
    byzantine_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="krum: assumed share f/n of Byzantine updates among a round's updates."
    )
    multikrum_m: int | None = Field(
        1, ge=1, description="krum: updates selected and averaged (1 = Krum; None = n - f, Multi-Krum)."
    )
    norm_bound: float | None = Field(
        None, gt=0, description="normbound: L2 bound each update is clipped to (None: the round's median update norm)."
    )
    q: float = Field(1.0, ge=0, description="qfedavg: fairness exponent (0 = the unweighted mean of the updates).")
    lipschitz: float | None = Field(None, gt=0, description="qfedavg: Lipschitz constant L (None: 1 / train.lr).")
    lora_aggregation: Literal["separate", "exact", "hetlora", "flexlora"] = Field(
        "separate",
        description="How LoRA factors are combined: 'separate' averages A and B on their own (mean(B) mean(A), not "
        "mean(B A)); 'exact' averages the products B_i A_i and re-factorises to the rank by truncated SVD; with "
        "heterogeneous client ranks (federation.lora_ranks), 'hetlora' averages each rank component over the clients "
        "holding it, 'flexlora' averages the products and redistributes by SVD.",
    )


def aggregator_of(s: StrategyConfig) -> str:
    """The aggregator a strategy section runs: strategy.aggregator, else the one of strategy.name."""
    return s.aggregator or (s.name if s.name in ROBUST else "mean")


def server_opt_of(s: StrategyConfig) -> str:
    """The server optimizer a strategy section runs: strategy.server_opt, else the one of strategy.name."""
    return s.server_opt or PRESET_OPTIMIZER.get(s.name, "sgd")


def parts(cfg) -> list[Part]:
    """What the strategy section switches on, as far as other parts are concerned."""
    s, out = cfg.strategy, []
    agg = aggregator_of(s)
    if agg != "mean":
        means = ", ".join(n for n in STRATEGY_NAMES if n not in ROBUST)
        what = AGGREGATOR_KINDS[agg]
        out.append(Part(f"strategy.aggregator={agg}" if s.aggregator else f"strategy.name={s.name}", {
            Cap.EACH_UPDATE: f"{what} over each update",
            Cap.IGNORES_WEIGHTS: f"{what} ignores the server pseudo-client's weight (or drops it)",
            Cap.NOT_MEAN: what,
        }, fix=f"choose strategy.aggregator=mean or one of {means}"))
    opt = server_opt_of(s)
    if opt in STATEFUL_OPTIMIZERS:
        out.append(Part(f"strategy.server_opt={opt}" if s.server_opt else f"strategy.name={s.name}",
                        {Cap.STATEFUL_SERVER_OPT: f"server {opt} keeps state across rounds"}))
    if s.server_lr != 1:
        out.append(Part(f"strategy.server_lr={s.server_lr:g}", {Cap.SCALED_STEP: "it scales the aggregated step"}))
    if s.name == "fedprox":
        out.append(Part("strategy.name=fedprox", {Cap.NON_EXAMPLE_GRADIENT: "the proximal term is not a sum over examples"},
                        fix="use fedavg/fedavgm/fedadam"))
    if s.name == "scaffold":
        out.append(Part("strategy.name=scaffold", {
            Cap.CLEAR_TENSORS: "it sends control variates in the clear",
            Cap.DENSE_UPDATE: "its control variates travel uncompressed",
            Cap.NON_EXAMPLE_GRADIENT: "the control correction is not a sum over examples (and the mean raw gradient "
            "would leave the client unprotected)",
            Cap.CONTROL_VARIATES: "",
            Cap.STATEFUL_SERVER_OPT: "its control variates live in the factors' basis",
        }, fix="use strategy.name=fedavg"))
    if s.lora_aggregation in ("exact", "flexlora"):
        out.append(Part(f"strategy.lora_aggregation={s.lora_aggregation}", {
            Cap.EACH_UPDATE: "it combines each client's LoRA factors", Cap.REPLACES_MEAN: "",
            Cap.DENSE_UPDATE: "exact/flexlora need each client's full factors, which compression would distort",
            Cap.REBASES: "",
        }, fix="use strategy.lora_aggregation=separate"))
    if s.lora_aggregation == "hetlora":
        out.append(Part("strategy.lora_aggregation=hetlora", {
            Cap.EACH_UPDATE: "it averages each rank component over the clients that hold it", Cap.REPLACES_MEAN: ""},
            fix="use strategy.lora_aggregation=separate"))
    return out


def check(cfg) -> None:
    """What the strategy section needs of the rest of the config."""
    s, fed = cfg.strategy, cfg.federation
    if s.lora_aggregation != "separate" and cfg.peft.method != "lora":
        raise ValueError(f"strategy.lora_aggregation={s.lora_aggregation} needs peft.method=lora")
    if s.lora_aggregation in ("hetlora", "flexlora") and fed.lora_ranks is None:
        raise ValueError(f"strategy.lora_aggregation={s.lora_aggregation} needs federation.lora_ranks")
