"""Named strategies: each is an aggregator x a server optimizer (Reddi et al. 2021's FedOpt split) plus what the
clients add to their training.

============  ====================  =====================  ===================================
name          aggregator            server optimizer       clients
============  ====================  =====================  ===================================
fedavg        mean                  sgd                    -
fedprox       mean                  sgd                    + (mu/2) ||w - w_global||^2
fedavgm       mean                  momentum               -
diloco        mean                  nesterov (lr 0.7)      many inner AdamW steps
fedadam/...   mean                  adam / yogi / adagrad  -
scaffold      mean (+ control)      sgd                    control variates (fedfm.features.scaffold)
median, ...   median / trimmed / krum / normbound   sgd   -
============  ====================  =====================  ===================================

``strategy.aggregator`` and ``strategy.server_opt`` override either part of a name, so combinations the
literature uses (a robust aggregator with server momentum, say) are one config line. Each preset is a frozen
dataclass of the hyper-parameters users know it by; ``aggregate(state, updates)`` runs a whole round's server side
on a list of updates (notebooks and tests; the round loop streams through the same aggregator and optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfm.aggregators.base import Aggregator
from fedfm.aggregators.mean import Mean, weighted_mean
from fedfm.aggregators.robust import Krum as KrumAggregator
from fedfm.aggregators.robust import Median as MedianAggregator
from fedfm.aggregators.robust import NormBound as NormBoundAggregator
from fedfm.aggregators.robust import TrimmedMean as TrimmedMeanAggregator
from fedfm.features.scaffold import CONTROL, control_config, control_step, init_control
from fedfm.server_opt.adaptive import Adaptive
from fedfm.server_opt.sgd import SGD, Momentum, Nesterov, apply
from fedfm.types import ClientUpdate, ServerState, Weights


class Strategy:
    """An aggregator and a server optimizer. Presets override ``aggregator``, ``optimizer`` and ``client_options``."""

    server_lr: float = 1.0

    def aggregator(self) -> Aggregator:
        return Mean()

    def optimizer(self):
        return SGD(self.server_lr)

    def client_options(self) -> dict:
        """Extra fields of every ClientTask (FedProx's ``prox_mu``)."""
        return {}

    @property
    def needs_individual_updates(self) -> bool:
        return self.aggregator().needs_individual_updates

    def init(self, weights: Weights) -> Weights:
        """The server optimizer's initial state (momentum, moments), kept in ``ServerState.opt``."""
        return self.optimizer().init(weights)

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """The next state from a whole round's updates, folded in client-name order; inputs are never modified."""
        fold = self.aggregator().start(None)
        for u in sorted(updates, key=lambda u: u.client):
            fold.add(u)
        agg = fold.result()
        weights, own = self.optimizer().step(state.weights, state.opt, agg.delta)
        return ServerState(state.round + 1, weights, {**state.opt, **own})


@dataclass(frozen=True)
class FedAvg(Strategy):
    """w <- w + server_lr * mean_n(delta). server_lr=1 is McMahan et al.'s FedAvg."""

    server_lr: float = 1.0


@dataclass(frozen=True)
class FedProx(Strategy):
    """FedAvg aggregation; clients add (mu/2)||w - w_global||^2 to their loss (Li et al. 2020)."""

    server_lr: float = 1.0
    prox_mu: float = 0.01

    def client_options(self) -> dict:
        return {"prox_mu": self.prox_mu}


@dataclass(frozen=True)
class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): v <- momentum * v + mean_n(delta); w <- w + server_lr * v."""

    server_lr: float = 1.0
    momentum: float = 0.9

    def optimizer(self):
        return Momentum(self.server_lr, self.momentum)


@dataclass(frozen=True)
class DiLoCo(Strategy):
    """DiLoCo (Douillard et al. 2023): the mean update as a pseudo-gradient for an outer Nesterov step."""

    server_lr: float = 0.7
    momentum: float = 0.9

    def optimizer(self):
        return Nesterov(self.server_lr, self.momentum)


@dataclass(frozen=True)
class _FedOpt(Strategy):
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    kind: str = "adam"

    def optimizer(self):
        return Adaptive(self.server_lr, self.beta1, self.beta2, self.tau, self.kind)


@dataclass(frozen=True)
class FedAdam(_FedOpt):
    """Adaptive server Adam on the averaged delta (Reddi et al. 2021)."""

    kind: str = "adam"


@dataclass(frozen=True)
class FedYogi(_FedOpt):
    """Yogi's additive second moment on the averaged delta (Reddi et al. 2021)."""

    kind: str = "yogi"


@dataclass(frozen=True)
class FedAdagrad(_FedOpt):
    """Reddi et al.'s FedAdagrad uses no first-moment decay (beta1 = 0): m = delta."""

    kind: str = "adagrad"


@dataclass(frozen=True)
class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020): x <- x + server_lr * mean(dy); c <- c + |S|/N mean(dc).

    In a run, the control variates are the ``scaffold`` feature's (``fedfm.features.scaffold``); this preset runs the
    same server step on a list of updates that carry ``control.<name>`` tensors."""

    server_lr: float = 1.0
    num_clients: int = 1  # N: set from the federation's size

    def init(self, weights: Weights) -> Weights:
        return init_control(weights)

    def task_config(self, state: ServerState) -> dict:
        """What each client receives beside the weights: the server control variate c."""
        return control_config(state.opt, state.weights)

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        model = [ClientUpdate(u.client, {k: u.delta[k] for k in state.weights}, u.num_examples) for u in updates]
        ctrl = [ClientUpdate(u.client, {k: u.delta[CONTROL + k] for k in state.weights}, 1.0) for u in updates]
        c = control_step(state.opt, state.weights, weighted_mean(ctrl), len(updates), self.num_clients)
        return ServerState(state.round + 1, apply(state.weights, weighted_mean(model), self.server_lr), c)


@dataclass(frozen=True)
class Median(Strategy):
    """w <- w + server_lr * median(delta): unweighted, tolerant of a minority of arbitrary updates."""

    server_lr: float = 1.0

    def aggregator(self) -> Aggregator:
        return MedianAggregator()


@dataclass(frozen=True)
class TrimmedMean(Strategy):
    """w <- w + server_lr * trimmed_mean(delta) (Yin et al. 2018): unweighted, drops trim_fraction of each tail."""

    server_lr: float = 1.0
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.aggregator()  # validates trim_fraction

    def aggregator(self) -> Aggregator:
        return TrimmedMeanAggregator(self.trim_fraction)


@dataclass(frozen=True)
class Krum(Strategy):
    """w <- w + server_lr * multi_krum(delta) (Blanchard et al. 2017). f = floor(byzantine_fraction * n) for the n
    updates of the round; multikrum_m = 1 is Krum, None selects n - f (Multi-Krum), an integer m selects min(m, n)."""

    server_lr: float = 1.0
    byzantine_fraction: float = 0.2
    multikrum_m: int | None = 1

    def __post_init__(self) -> None:
        self.aggregator()  # validates the fields

    def aggregator(self) -> Aggregator:
        return KrumAggregator(self.byzantine_fraction, self.multikrum_m)


@dataclass(frozen=True)
class NormBound(Strategy):
    """w <- w + server_lr * norm_bounded_mean(delta) (Sun et al. 2019). norm_bound None = the round's median norm."""

    server_lr: float = 1.0
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        self.aggregator()

    def aggregator(self) -> Aggregator:
        return NormBoundAggregator(self.norm_bound)


__all__ = ["Strategy", "weighted_mean", "apply", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad",
           "DiLoCo", "Scaffold", "Median", "TrimmedMean", "Krum", "NormBound"]
