"""Where the names in a config become objects: one line per strategy, aggregator, server optimizer and feature.

A new one is its own module plus one line here (and, if it has settings, its config section). Everything past
this module is typed.
"""

from __future__ import annotations

from fedfm.aggregators.mean import Mean
from fedfm.aggregators.qfedavg import QFedAvg
from fedfm.aggregators.robust import Krum, Median, NormBound, TrimmedMean
from fedfm.features.attack import Attack
from fedfm.features.base import Feature
from fedfm.features.ccvr import CCVR
from fedfm.features.compression import Compression
from fedfm.features.continual import Continual
from fedfm.features.dpsgd import DPSGD
from fedfm.features.faults import Faults
from fedfm.features.fedaws import FedAwS
from fedfm.features.fedetf import FedETF
from fedfm.features.fedrs import FedRS
from fedfm.features.logit_adjustment import LogitAdjustment
from fedfm.features.lora_aggregation import LoraAggregation
from fedfm.features.lora_ranks import LoraRanks
from fedfm.features.norm_screen import NormScreening
from fedfm.features.optimizer_state import KeepOptimizerState
from fedfm.features.personal import Personal
from fedfm.features.private import Private
from fedfm.features.scaffold import Scaffold as ScaffoldFeature
from fedfm.features.server_data import ServerData
from fedfm.server_opt.adaptive import Adaptive
from fedfm.server_opt.sgd import SGD, Momentum, Nesterov
from fedfm.strategies import (
    DiLoCo, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Krum as KrumPreset, Median as MedianPreset,
    NormBound as NormBoundPreset, Scaffold, Strategy, TrimmedMean as TrimmedMeanPreset,
)

# strategy.name -> a preset: an aggregator and a server optimizer with the hyper-parameters users know it by
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "diloco": DiLoCo,
    "scaffold": Scaffold,
    "median": MedianPreset,
    "trimmed_mean": TrimmedMeanPreset,
    "krum": KrumPreset,
    "normbound": NormBoundPreset,
}

# strategy.aggregator -> the aggregator, built from the run config (overrides the preset's)
AGGREGATORS = {
    "mean": lambda c: Mean(),
    "median": lambda c: Median(),
    "trimmed_mean": lambda c: TrimmedMean(c.strategy.trim_fraction),
    "krum": lambda c: Krum(c.strategy.byzantine_fraction, c.strategy.multikrum_m),
    "normbound": lambda c: NormBound(c.strategy.norm_bound),
    "qfedavg": lambda c: QFedAvg(c.strategy.q, c.strategy.lipschitz or 1 / c.train.lr),
}

# strategy.server_opt -> the server optimizer, built from the strategy section (overrides the preset's)
SERVER_OPTIMIZERS = {
    "sgd": lambda s: SGD(s.server_lr),
    "momentum": lambda s: Momentum(s.server_lr, s.momentum),
    "nesterov": lambda s: Nesterov(s.server_lr, s.momentum),
    "adam": lambda s: Adaptive(s.server_lr, s.beta1, s.beta2, s.tau, "adam"),
    "yogi": lambda s: Adaptive(s.server_lr, s.beta1, s.beta2, s.tau, "yogi"),
    "adagrad": lambda s: Adaptive(s.server_lr, s.beta1, s.beta2, s.tau, "adagrad"),
}

# features, in the order their hooks run (client: dropout first, then what shapes training; what leaves the client
# in the order control change -> attack -> own rank -> compression -> DP and mask; server: aggregator wrappers from
# the innermost out)
FEATURES: list[type[Feature]] = [
    Continual,
    Faults,
    LogitAdjustment,
    FedRS,
    FedAwS,
    FedETF,
    KeepOptimizerState,
    DPSGD,
    LoraAggregation,
    ScaffoldFeature,
    Personal,
    Attack,
    LoraRanks,
    Compression,
    Private,
    ServerData,
    NormScreening,
    CCVR,
]


def build_strategy(cfg, num_clients: int | None = None) -> Strategy:
    """StrategyConfig -> the named preset with the config's hyper-parameters."""
    cls = STRATEGIES[cfg.name]
    fields = cls.__dataclass_fields__
    values = {k: v for k, v in cfg.model_dump().items() if k in fields}
    if "num_clients" in fields and num_clients is not None:
        values["num_clients"] = num_clients
    return cls(**values)


def build_aggregation(cfg, num_clients: int):
    """(aggregator, server optimizer, client options) of a federated run: the preset of ``strategy.name``, with
    ``strategy.aggregator`` / ``strategy.server_opt`` replacing its parts when set."""
    s = cfg.strategy
    preset = build_strategy(s, num_clients)
    aggregator = AGGREGATORS[s.aggregator](cfg) if s.aggregator else preset.aggregator()
    optimizer = SERVER_OPTIMIZERS[s.server_opt](s) if s.server_opt else preset.optimizer()
    return aggregator, optimizer, preset.client_options()


def build_features(cfg, app) -> list[Feature]:
    """The features ``cfg`` switches on, set up for ``app`` (in hook order)."""
    return [f(app) for f in FEATURES if f.active(cfg)]
