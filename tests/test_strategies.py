"""Tests of fedfm.strategies: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad.

Every expected number is worked out by hand in a comment next to it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from tensors import T, close, upd

from fedfm.config import StrategyConfig
from fedfm.registry import STRATEGIES, build_strategy
from fedfm.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    weighted_mean,
)
from fedfm.types import ServerState


def start(strategy, **weights: torch.Tensor) -> ServerState:
    return ServerState(0, dict(weights), strategy.init(dict(weights)))


# --- weighted_mean / FedAvg ------------------------------------------------------------------------


def test_weighted_mean_is_example_weighted():
    ups = [upd("a", 1, x=T(1, 2)), upd("b", 3, x=T(3, 4))]
    # (1*[1,2] + 3*[3,4]) / 4 = [1+9, 2+12] / 4 = [2.5, 3.5]
    out = weighted_mean(ups)
    assert torch.equal(out["x"], T(2.5, 3.5))
    assert out["x"].dtype == torch.float32


def test_weighted_mean_of_zero_updates_raises():
    with pytest.raises(ValueError, match="zero updates"):
        weighted_mean([])


def test_fedavg_applies_server_lr_to_weighted_mean():
    s = FedAvg(server_lr=0.5)
    st = start(s, x=T(10, 20), y=T(1))
    ups = [upd("a", 1, x=T(1, 2), y=T(4)), upd("b", 3, x=T(3, 4), y=T(0))]
    new = s.aggregate(st, ups)
    # mean x = (1*[1,2] + 3*[3,4]) / 4 = [2.5, 3.5];  w = [10,20] + 0.5*[2.5,3.5] = [11.25, 21.75]
    assert torch.equal(new.weights["x"], T(11.25, 21.75))
    # mean y = (1*4 + 3*0) / 4 = 1;  w = 1 + 0.5*1 = 1.5
    assert torch.equal(new.weights["y"], T(1.5))
    assert new.round == 1
    assert new.opt == {}


def test_fedavg_server_lr_one_is_plain_mean():
    s = FedAvg()  # server_lr = 1
    st = start(s, x=T(0, 0))
    new = s.aggregate(st, [upd("a", 2, x=T(2, 0)), upd("b", 2, x=T(0, 4))])
    # (2*[2,0] + 2*[0,4]) / 4 = [1, 2];  w = [0,0] + 1*[1,2] = [1, 2]
    assert torch.equal(new.weights["x"], T(1, 2))


def test_aggregate_is_independent_of_update_order():
    g = torch.Generator().manual_seed(0)
    ups = [
        upd(f"client{i}", int(torch.randint(1, 50, (1,), generator=g)), x=torch.randn(7, generator=g), y=torch.randn(2, 3, generator=g))
        for i in range(6)
    ]
    w = {"x": torch.randn(7, generator=g), "y": torch.randn(2, 3, generator=g)}
    for strategy in (FedAvg(server_lr=0.7), FedAvgM(), FedAdam(), FedYogi(), FedAdagrad()):
        ref = strategy.aggregate(ServerState(0, dict(w), strategy.init(w)), ups)
        rng = random.Random(1)
        for _ in range(4):
            shuffled = list(ups)
            rng.shuffle(shuffled)
            got = strategy.aggregate(ServerState(0, dict(w), strategy.init(w)), shuffled)
            for k in w:  # bitwise equal, not merely close
                assert torch.equal(got.weights[k], ref.weights[k]), (strategy, k)
            for k in ref.opt:
                assert torch.equal(got.opt[k], ref.opt[k]), (strategy, k)
    ref_mean = weighted_mean(ups)
    got_mean = weighted_mean(list(reversed(ups)))
    assert all(torch.equal(ref_mean[k], got_mean[k]) for k in ref_mean)


# --- FedProx ---------------------------------------------------------------------------------------


def test_fedprox_aggregates_like_fedavg_and_sends_prox_mu():
    ups = [upd("a", 1, x=T(1, 2)), upd("b", 3, x=T(3, 4))]
    w = {"x": T(10, 20)}
    prox, avg = FedProx(server_lr=0.5, prox_mu=0.25), FedAvg(server_lr=0.5)
    a = prox.aggregate(ServerState(0, dict(w), prox.init(w)), ups)
    b = avg.aggregate(ServerState(0, dict(w), avg.init(w)), ups)
    assert torch.equal(a.weights["x"], b.weights["x"])
    # same as FedAvg: [10,20] + 0.5*[2.5,3.5] = [11.25, 21.75]
    assert torch.equal(a.weights["x"], T(11.25, 21.75))
    assert a.opt == b.opt == {}
    assert prox.client_options() == {"prox_mu": 0.25}
    assert avg.client_options() == {}
    assert FedProx().client_options() == {"prox_mu": 0.01}


# --- FedAvgM ---------------------------------------------------------------------------------------


def test_fedavgm_momentum_accumulates_over_two_rounds():
    s = FedAvgM(server_lr=0.5, momentum=0.5)
    st = start(s, x=T(1, 1))
    assert torch.equal(st.opt["v.x"], T(0, 0))  # v starts at 0
    # round 1: delta = [2,4]; v1 = 0.5*[0,0] + [2,4] = [2,4];  w1 = [1,1] + 0.5*[2,4] = [2, 3]
    st1 = s.aggregate(st, [upd("a", 5, x=T(2, 4))])
    assert torch.equal(st1.opt["v.x"], T(2, 4))
    assert torch.equal(st1.weights["x"], T(2, 3))
    assert st1.round == 1
    # round 2: delta = [0,-2]; v2 = 0.5*[2,4] + [0,-2] = [1, 0];  w2 = [2,3] + 0.5*[1,0] = [2.5, 3]
    # (element 0 still moves although its delta is 0: that is the momentum)
    st2 = s.aggregate(st1, [upd("a", 5, x=T(0, -2))])
    assert torch.equal(st2.opt["v.x"], T(1, 0))
    assert torch.equal(st2.weights["x"], T(2.5, 3))
    assert st2.round == 2


def test_fedavgm_uses_weighted_mean():
    s = FedAvgM(server_lr=1.0, momentum=0.9)
    st = start(s, x=T(0))
    # delta = (1*4 + 3*0)/4 = 1; v1 = 0.9*0 + 1 = 1; w1 = 0 + 1*1 = 1
    st1 = s.aggregate(st, [upd("a", 1, x=T(4)), upd("b", 3, x=T(0))])
    assert torch.equal(st1.opt["v.x"], T(1))
    assert torch.equal(st1.weights["x"], T(1))


# --- FedOpt: FedAdam, FedYogi, FedAdagrad ------------------------------------------------------------


def test_fedopt_init_m_zero_v_tau_squared():
    for cls in (FedAdam, FedYogi, FedAdagrad):
        s = cls(tau=0.5)
        opt = s.init({"x": T(3, 4), "y": T(1)})
        assert set(opt) == {"m.x", "v.x", "m.y", "v.y"}
        assert torch.equal(opt["m.x"], T(0, 0))
        assert torch.equal(opt["v.x"], T(0.25, 0.25))  # tau^2 = 0.25
        assert torch.equal(opt["v.y"], T(0.25))


def test_fedadam_two_rounds():
    s = FedAdam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    st = start(s, x=T(0, 0))  # m0 = [0,0], v0 = tau^2 = [1,1]
    # round 1: d1 = [1, 7]
    #   m1 = 0.5*0 + 0.5*[1,7] = [0.5, 3.5]
    #   v1 = 0.5*[1,1] + 0.5*[1,49] = [1, 25]
    #   w1 = 0 + 1 * [0.5/(sqrt1+1), 3.5/(sqrt25+1)] = [0.5/2, 3.5/6] = [0.25, 7/12 = 0.58333]
    st1 = s.aggregate(st, [upd("a", 3, x=T(1, 7))])
    close(st1.opt["m.x"], [0.5, 3.5])
    close(st1.opt["v.x"], [1.0, 25.0])
    close(st1.weights["x"], [0.25, 7 / 12])
    # round 2: d2 = [-1, 5]
    #   m2 = 0.5*[0.5,3.5] + 0.5*[-1,5] = [0.25-0.5, 1.75+2.5] = [-0.25, 4.25]
    #   v2 = 0.5*[1,25] + 0.5*[1,25] = [1, 25]
    #   w2 = [0.25, 7/12] + [-0.25/2, 4.25/6] = [0.125, 14/24 + 17/24 = 31/24 = 1.291667]
    st2 = s.aggregate(st1, [upd("a", 3, x=T(-1, 5))])
    close(st2.opt["m.x"], [-0.25, 4.25])
    close(st2.opt["v.x"], [1.0, 25.0])
    close(st2.weights["x"], [0.125, 31 / 24])
    assert st2.round == 2


def test_fedadam_server_lr_scales_step():
    s = FedAdam(server_lr=0.1, beta1=0.5, beta2=0.5, tau=1.0)
    st = start(s, x=T(2))
    # d = 7: m1 = 3.5, v1 = 0.5*1 + 0.5*49 = 25, w1 = 2 + 0.1*3.5/(5+1) = 2 + 0.35/6 = 2.058333
    st1 = s.aggregate(st, [upd("a", 1, x=T(7))])
    close(st1.weights["x"], [2 + 0.35 / 6])


def test_fedyogi_two_rounds():
    s = FedYogi(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    st = start(s, x=T(0, 0, 0))  # m0 = 0, v0 = tau^2 = [1,1,1]
    # round 1: d1 = [1, 4, 0];  d1^2 = [1, 16, 0];  sign(v0 - d1^2) = sign([0, -15, 1]) = [0, -1, 1]
    #   v1 = v0 - 0.5*d1^2*sign = [1 - 0, 1 + 8, 1 - 0] = [1, 9, 1]
    #   m1 = 0.5*[1, 4, 0] = [0.5, 2, 0]
    #   w1 = [0.5/(1+1), 2/(3+1), 0/(1+1)] = [0.25, 0.5, 0]
    st1 = s.aggregate(st, [upd("a", 1, x=T(1, 4, 0))])
    close(st1.opt["v.x"], [1, 9, 1])
    close(st1.opt["m.x"], [0.5, 2, 0])
    close(st1.weights["x"], [0.25, 0.5, 0])
    # round 2: d2 = [2, 2, 0];  d2^2 = [4, 4, 0];  sign(v1 - d2^2) = sign([-3, 5, 1]) = [-1, 1, 1]
    #   v2 = [1 + 0.5*4, 9 - 0.5*4, 1 - 0] = [3, 7, 1]     (FedAdam would give [2.5, 6.5, 0.5])
    #   m2 = 0.5*[0.5, 2, 0] + 0.5*[2, 2, 0] = [1.25, 2, 0]
    #   w2 = [0.25 + 1.25/(sqrt3+1), 0.5 + 2/(sqrt7+1), 0]
    #      = [0.25 + 1.25/2.7320508, 0.5 + 2/3.6457513, 0] = [0.7075318, 1.0485838, 0]
    st2 = s.aggregate(st1, [upd("a", 1, x=T(2, 2, 0))])
    close(st2.opt["v.x"], [3, 7, 1])
    close(st2.opt["m.x"], [1.25, 2, 0])
    close(st2.weights["x"], [0.25 + 1.25 / (math.sqrt(3) + 1), 0.5 + 2 / (math.sqrt(7) + 1), 0.0])
    close(st2.weights["x"], [0.7075318, 1.0485838, 0.0])


def test_fedadagrad_two_rounds_ignores_beta1():
    # beta1 = 0.9 is given but FedAdagrad uses beta1 = 0 (m = delta)
    s = FedAdagrad(server_lr=1.0, beta1=0.9, tau=3.0)
    st = start(s, x=T(0, 0))  # m0 = 0, v0 = tau^2 = [9, 9]
    # round 1: d1 = [4, -4]: m1 = d1 = [4, -4];  v1 = [9+16, 9+16] = [25, 25]
    #   w1 = [4/(5+3), -4/(5+3)] = [0.5, -0.5]
    st1 = s.aggregate(st, [upd("a", 2, x=T(4, -4))])
    close(st1.opt["m.x"], [4, -4])
    close(st1.opt["v.x"], [25, 25])
    close(st1.weights["x"], [0.5, -0.5])
    # round 2: d2 = [12, 0]: m2 = [12, 0] (with beta1=0.9 it would be [4.8, -0.4]);  v2 = [25+144, 25+0] = [169, 25]
    #   w2 = [0.5 + 12/(13+3), -0.5 + 0/(5+3)] = [0.5 + 0.75, -0.5] = [1.25, -0.5]
    st2 = s.aggregate(st1, [upd("a", 2, x=T(12, 0))])
    close(st2.opt["m.x"], [12, 0])
    close(st2.opt["v.x"], [169, 25])
    close(st2.weights["x"], [1.25, -0.5])


def test_fedopt_uses_weighted_mean_of_deltas():
    s = FedAdagrad(server_lr=1.0, tau=3.0)
    st = start(s, x=T(0))
    # delta = (1*16 + 3*0)/4 = 4; v1 = 9 + 16 = 25; w1 = 4/(5+3) = 0.5
    st1 = s.aggregate(st, [upd("a", 1, x=T(16)), upd("b", 3, x=T(0))])
    close(st1.weights["x"], [0.5])


# --- purity ----------------------------------------------------------------------------------------


ALL = [FedAvg(server_lr=0.5), FedProx(prox_mu=0.1), FedAvgM(momentum=0.5), FedAdam(), FedYogi(), FedAdagrad()]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: type(s).__name__)
def test_aggregate_does_not_modify_inputs(strategy):
    w = {"x": T(1, 2, 3), "y": T(-1)}
    st = ServerState(4, dict(w), strategy.init(w))
    # make the strategy state non-trivial first
    st = strategy.aggregate(st, [upd("a", 2, x=T(0.5, -0.5, 1), y=T(2))])
    ups = [upd("a", 2, x=T(1, 1, 1), y=T(3)), upd("b", 1, x=T(-2, 0, 4), y=T(0))]
    w_before = {k: v.clone() for k, v in st.weights.items()}
    opt_before = {k: v.clone() for k, v in st.opt.items()}
    d_before = [{k: v.clone() for k, v in u.delta.items()} for u in ups]
    keys_before = (set(st.weights), set(st.opt))

    new = strategy.aggregate(st, ups)

    assert st.round == 5 and new.round == 6
    assert (set(st.weights), set(st.opt)) == keys_before
    for k in w_before:
        assert torch.equal(st.weights[k], w_before[k])
        assert new.weights[k] is not st.weights[k]
        assert not torch.equal(new.weights[k], st.weights[k])  # it did move
    for k in opt_before:
        assert torch.equal(st.opt[k], opt_before[k])
    for u, d in zip(ups, d_before):
        assert all(torch.equal(u.delta[k], d[k]) for k in d)
    assert new.weights is not st.weights and new.opt is not st.opt


# --- build_strategy --------------------------------------------------------------------------------


def test_build_strategy_fedavg():
    s = build_strategy(StrategyConfig(name="fedavg", server_lr=0.5))
    assert type(s) is FedAvg
    assert s == FedAvg(server_lr=0.5)


def test_build_strategy_fedprox():
    s = build_strategy(StrategyConfig(name="fedprox", server_lr=0.5, prox_mu=0.3))
    assert type(s) is FedProx
    assert s == FedProx(server_lr=0.5, prox_mu=0.3)


def test_build_strategy_fedavgm():
    s = build_strategy(StrategyConfig(name="fedavgm", server_lr=0.7, momentum=0.5))
    assert type(s) is FedAvgM
    assert s == FedAvgM(server_lr=0.7, momentum=0.5)


@pytest.mark.parametrize(("name", "cls", "kind"), [("fedadam", FedAdam, "adam"), ("fedyogi", FedYogi, "yogi"), ("fedadagrad", FedAdagrad, "adagrad")])
def test_build_strategy_fedopt(name, cls, kind):
    s = build_strategy(StrategyConfig(name=name, server_lr=0.05, beta1=0.8, beta2=0.95, tau=0.01))
    assert type(s) is cls
    assert (s.server_lr, s.beta1, s.beta2, s.tau, s.kind) == (0.05, 0.8, 0.95, 0.01, kind)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_build_strategy_every_registered_name(name):
    s = build_strategy(StrategyConfig(name=name))
    assert type(s) is STRATEGIES[name]
    assert s.server_lr == StrategyConfig().server_lr
