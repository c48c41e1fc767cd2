"""Server strategies: pure functions of explicit state.

A strategy is a frozen dataclass of hyper-parameters with three methods:

- ``init(weights) -> opt``: the strategy's own state tensors (momentum, moments), kept in ServerState.opt;
- ``client_options() -> dict``: extra fields for the ClientTask (e.g. FedProx's ``prox_mu``);
- ``aggregate(state, updates) -> ServerState``: the next state; inputs are never modified.

Adding one is one file plus one line in ``STRATEGIES``.
"""

from fedfm.strategies.diloco import DiLoCo
from fedfm.strategies.fedavg import FedAvg, FedAvgM, FedProx, weighted_mean
from fedfm.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedfm.strategies.robust import Krum, Median, NormBound, TrimmedMean
from fedfm.strategies.scaffold import Scaffold

STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "diloco": DiLoCo,
    "scaffold": Scaffold,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "normbound": NormBound,
}


def build_strategy(cfg, num_clients: int | None = None):
    """StrategyConfig -> strategy object (the one place the strategy name becomes code)."""
    cls = STRATEGIES[cfg.name]
    fields = cls.__dataclass_fields__
    values = {k: v for k, v in cfg.model_dump().items() if k in fields}
    if "num_clients" in fields and num_clients is not None:
        values["num_clients"] = num_clients
    return cls(**values)


__all__ = ["STRATEGIES", "build_strategy", "weighted_mean", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "DiLoCo", "Scaffold", "Median", "TrimmedMean", "Krum", "NormBound"]
