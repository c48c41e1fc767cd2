"""Tests of fedfm.aggregators.robust: trimmed mean, Krum / Multi-Krum, norm bounding, norm outliers, and the
strategies built on them (plus Median). Plain tensors only.

Every expected number is worked out by hand in a comment next to it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from tensors import T, upd
from tensors import close as _close

from fedfm.aggregators.mean import weighted_mean
from fedfm.strategies import Krum, Median, NormBound, TrimmedMean
from fedfm.aggregators.robust import (
    clip_to_norm,
    coordinate_median,
    flat,
    krum_scores,
    multi_krum,
    norm_bounded_mean,
    norm_outliers,
    trimmed_mean,
)
from fedfm.types import ClientUpdate, ServerState


def close(actual, expected):
    _close(actual, expected, atol=1e-6)


# --- flat --------------------------------------------------------------------------------------------


def test_flat_concatenates_in_sorted_key_order():
    d = {"b": T(3, 4), "a": torch.tensor([[1.0], [2.0]])}
    # sorted keys: a ([[1],[2]] -> [1,2]) then b ([3,4])
    assert torch.equal(flat(d), T(1, 2, 3, 4))
    assert flat(d).dtype == torch.float32


# --- trimmed mean ------------------------------------------------------------------------------------


def test_trimmed_mean_drops_both_tails():
    xs = [1, 2, 3, 100, -50]
    ups = [upd(c, 1 + i, x=T(v, 5)) for i, (c, v) in enumerate(zip("abcde", xs))]
    # n = 5, k = floor(0.2 * 5) = 1: sorted [-50, 1, 2, 3, 100] -> drop -50 and 100 -> mean(1, 2, 3) = 2
    # second coordinate: all 5 -> 5.  Unweighted: num_examples (1..5) play no part.
    close(trimmed_mean(ups, 0.2)["x"], [2, 5])


def test_trimmed_mean_with_zero_trim_is_the_unweighted_mean():
    ups = [upd("a", 1, x=T(1)), upd("b", 3, x=T(3))]
    # k = 0: (1 + 3) / 2 = 2 (the example-weighted mean would be (1 + 9) / 4 = 2.5)
    close(trimmed_mean(ups, 0.0)["x"], [2])


def test_trimmed_mean_that_trims_everything_raises():
    ups = [upd(c, 1, x=T(i)) for i, c in enumerate("abcd")]
    # n = 4, trim 0.5: k = 2, 2k = 4 >= 4 leaves nothing
    with pytest.raises(ValueError, match="leaving none"):
        trimmed_mean(ups, 0.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(trim_fraction=0.5)


# --- Krum / Multi-Krum -------------------------------------------------------------------------------

# five 2-D points: a corner square around a centre d, and a far outlier e
#   a = (0,0)  b = (2,0)  c = (0,2)  d = (1,1)  e = (10,10)
# squared distances:
#   a-b 4   a-c 4   a-d 2   a-e 200
#   b-c 8   b-d 2   b-e 8^2+10^2 = 164
#   c-d 2   c-e 10^2+8^2 = 164
#   d-e 9^2+9^2 = 162
# f = 1 -> n - f - 2 = 2 nearest neighbours:
#   a: {2,4,4,200} -> 2+4 = 6      b: {2,4,8,164} -> 6      c: {2,4,8,164} -> 6
#   d: {2,2,2,162} -> 2+2 = 4      e: {162,164,164,200} -> 162+164 = 326
POINTS = {"a": (0, 0), "b": (2, 0), "c": (0, 2), "d": (1, 1), "e": (10, 10)}
EXAMPLES = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 1}


def krum_updates() -> list[ClientUpdate]:
    return [upd(c, EXAMPLES[c], x=T(*p)) for c, p in POINTS.items()]


def test_krum_scores_by_hand():
    assert krum_scores(krum_updates(), f=1) == [6.0, 6.0, 6.0, 4.0, 326.0]
    # f = 0 -> 3 neighbours: a {2,4,4} = 10, b {2,4,8} = 14, c 14, d {2,2,2} = 6, e {162,164,164} = 490
    assert krum_scores(krum_updates(), f=0) == [10.0, 14.0, 14.0, 6.0, 490.0]
    # f = 3 -> n - f - 2 = 0, at least 1 neighbour: a 2, b 2, c 2, d 2, e 162
    assert krum_scores(krum_updates(), f=3) == [2.0, 2.0, 2.0, 2.0, 162.0]


def test_krum_picks_the_central_update():
    mean, chosen = multi_krum(krum_updates(), f=1, m=1)
    # lowest score: d (4) -> its delta unchanged
    assert chosen == ["d"]
    close(mean["x"], [1, 1])


def test_multi_krum_mean_of_the_selected():
    mean, chosen = multi_krum(krum_updates(), f=1, m=3)
    # d (4), then the tie at 6 broken by name: a, b.
    # example-weighted: (2*(1,1) + 1*(0,0) + 1*(2,0)) / 4 = (4,2) / 4 = (1, 0.5)
    assert chosen == ["d", "a", "b"]
    close(mean["x"], [1, 0.5])


def test_far_outlier_is_never_selected():
    for m in range(1, 5):
        _, chosen = multi_krum(krum_updates(), f=1, m=m)
        assert "e" not in chosen
    gen = torch.Generator().manual_seed(0)
    ups = [upd(f"h{i}", 1, x=torch.randn(6, generator=gen)) for i in range(7)] + [upd("z", 1, x=torch.full((6,), 50.0))]
    for m in range(1, 8):  # n - f = 8 - 1 = 7 honest updates
        assert "z" not in multi_krum(ups, f=1, m=m)[1]


def test_multi_krum_rejects_bad_m():
    with pytest.raises(ValueError, match="between 1 and 5"):
        multi_krum(krum_updates(), f=1, m=6)
    with pytest.raises(ValueError, match="between 1 and 5"):
        multi_krum(krum_updates(), f=1, m=0)


def test_krum_strategy_selects_by_byzantine_fraction():
    w = {"x": T(10, 20)}
    # f = floor(0.2 * 5) = 1, m = 1: d = (1,1);  w = (10,20) + 0.5*(1,1) = (10.5, 20.5)
    new = Krum(server_lr=0.5, byzantine_fraction=0.2).aggregate(ServerState(3, dict(w), {}), krum_updates())
    close(new.weights["x"], [10.5, 20.5])
    assert new.round == 4 and new.opt == {}
    # multikrum_m None: m = n - f = 4 -> d, a, b, c;  (2*(1,1) + (0,0) + (2,0) + (0,2)) / 5 = (0.8, 0.8)
    new = Krum(multikrum_m=None).aggregate(ServerState(0, dict(w), {}), krum_updates())
    close(new.weights["x"], [10.8, 20.8])
    # multikrum_m larger than the round: all 5 (clamped), the plain weighted mean
    new = Krum(multikrum_m=9).aggregate(ServerState(0, dict(w), {}), krum_updates())
    assert torch.allclose(new.weights["x"], w["x"] + weighted_mean(krum_updates())["x"])


# --- norm bounding -----------------------------------------------------------------------------------


def test_clip_to_norm_scales_big_and_keeps_small():
    clipped, norm = clip_to_norm({"x": T(3, 4)}, 1.0)
    # ||(3,4)|| = 5 -> (3,4) / 5 = (0.6, 0.8)
    assert norm == pytest.approx(5.0)
    close(clipped["x"], [0.6, 0.8])
    # the norm is global over tensors: x = 3, y = 4 -> 5 -> (0.6), (0.8)
    clipped, norm = clip_to_norm({"x": T(3), "y": T(4)}, 1.0)
    close(clipped["x"], [0.6])
    close(clipped["y"], [0.8])
    small = {"x": T(0.3, 0.4)}
    clipped, norm = clip_to_norm(small, 1.0)  # norm 0.5 <= 1: untouched (as a new tensor)
    assert norm == pytest.approx(0.5)
    assert torch.equal(clipped["x"], small["x"]) and clipped["x"] is not small["x"]


def test_norm_bounded_mean_fixed_bound():
    ups = [upd("a", 1, x=T(3, 4)), upd("b", 1, x=T(0.3, 0.4))]
    # a clipped to (0.6, 0.8), b kept: ((0.6,0.8) + (0.3,0.4)) / 2 = (0.45, 0.6)
    close(norm_bounded_mean(ups, 1.0)["x"], [0.45, 0.6])


def test_norm_bounded_mean_adaptive_bound_is_the_median_norm():
    ups = [upd("a", 1, x=T(1, 0)), upd("b", 1, x=T(0, 2)), upd("c", 1, x=T(6, 8))]
    # norms 1, 2, 10 -> median 2: c = (6,8) * 2/10 = (1.2, 1.6); a, b kept
    # mean = ((1,0) + (0,2) + (1.2,1.6)) / 3 = (2.2/3, 3.6/3)
    close(norm_bounded_mean(ups, None)["x"], [2.2 / 3, 1.2])
    new = NormBound().aggregate(ServerState(0, {"x": T(0, 0)}, {}), ups)
    close(new.weights["x"], [2.2 / 3, 1.2])


def test_norm_outliers_flags_only_the_big_one():
    ups = [upd("a", 1, x=T(1, 0)), upd("b", 1, x=T(0, 2)), upd("c", 1, x=T(6, 8))]
    # norms 1, 2, 10; median 2; limit 4x = 8: only c (10 = 5.0x the median)
    assert norm_outliers(ups, 4.0) == {"c": "update norm 10 is 5.0x the round's median 2 (limit 4x)"}
    assert norm_outliers(ups, 5.0) == {}  # 10 is not > 5 * 2
    assert norm_outliers(ups[:2], 1.0) == {}  # fewer than 3 updates: no verdict


# --- the strategies ----------------------------------------------------------------------------------

ROBUST = [
    Median(),
    TrimmedMean(trim_fraction=0.2),
    Krum(byzantine_fraction=0.2),
    Krum(byzantine_fraction=0.2, multikrum_m=None),
    NormBound(),
    NormBound(norm_bound=1.0),
]


def some_updates() -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(1)
    return [upd(f"c{i}", 1 + i, x=torch.randn(3, generator=gen), y=torch.randn(2, 2, generator=gen)) for i in range(6)]


def some_weights() -> dict[str, torch.Tensor]:
    return {"x": T(1, 2, 3), "y": torch.ones(2, 2)}


@pytest.mark.parametrize("strategy", ROBUST, ids=repr)
def test_robust_strategy_contract(strategy):
    assert strategy.needs_individual_updates is True
    assert strategy.init(some_weights()) == {} and strategy.client_options() == {}
    w, ups = some_weights(), some_updates()
    st = ServerState(7, w, {"keep": T(1)})
    w_before = {k: v.clone() for k, v in w.items()}
    d_before = [{k: v.clone() for k, v in u.delta.items()} for u in ups]
    new = strategy.aggregate(st, ups)
    assert new.round == 8
    assert set(new.opt) == {"keep"} and new.opt is not st.opt
    # inputs untouched
    assert all(torch.equal(w[k], w_before[k]) for k in w)
    assert all(torch.equal(u.delta[k], d[k]) for u, d in zip(ups, d_before) for k in d)
    # server_lr scales the step: w + 0.5 * step
    half = type(strategy)(**{**strategy.__dict__, "server_lr": 0.5}).aggregate(st, ups)
    for k in w:
        assert torch.allclose(half.weights[k] - w[k], 0.5 * (new.weights[k] - w[k]), atol=1e-6)
    # order-independent, bit for bit
    rng = random.Random(0)
    for _ in range(3):
        shuffled = list(ups)
        rng.shuffle(shuffled)
        got = strategy.aggregate(ServerState(7, dict(w), {"keep": T(1)}), shuffled)
        assert all(torch.equal(got.weights[k], new.weights[k]) for k in w)


@pytest.mark.parametrize("strategy", ROBUST, ids=repr)
def test_robust_strategy_zero_updates_raise(strategy):
    with pytest.raises(ValueError, match="zero updates"):
        strategy.aggregate(ServerState(0, some_weights(), {}), [])


@pytest.mark.parametrize(
    "fn",
    [
        coordinate_median,
        lambda u: trimmed_mean(u, 0.2),
        lambda u: krum_scores(u, 1),
        lambda u: multi_krum(u, 1, 1),
        lambda u: norm_bounded_mean(u, 1.0),
        lambda u: norm_bounded_mean(u, None),
        lambda u: norm_outliers(u, 5.0),
    ],
)
def test_every_function_raises_on_zero_updates(fn):
    with pytest.raises(ValueError, match="zero updates"):
        fn([])


def test_strategy_fields_are_validated():
    with pytest.raises(ValueError):
        Krum(byzantine_fraction=1.0)
    with pytest.raises(ValueError):
        Krum(multikrum_m=0)
    with pytest.raises(ValueError):
        NormBound(norm_bound=0.0)


# --- a 20% sign-flip attack --------------------------------------------------------------------------


def test_sign_flip_breaks_fedavg_but_not_the_robust_rules():
    gen = torch.Generator().manual_seed(0)
    mu = torch.linspace(0.5, 1.5, 20)  # ||mu|| ~ 4.6
    honest = [upd(f"h{i}", 10, x=mu + 0.01 * torch.randn(20, generator=gen)) for i in range(8)]
    attackers = [upd(f"z{i}", 10, x=-4 * mu) for i in range(2)]
    ups = honest + attackers
    size = float(mu.norm())

    def dist(step) -> float:
        return float((step["x"] - mu).norm()) / size

    # FedAvg: 0.8 * mu + 0.2 * (-4 mu) = 0 -> distance ~ ||mu|| (relative 1)
    assert dist(weighted_mean(ups)) > 0.95
    # median: per coordinate the two -4 mu values sit below the 8 honest ones; the middle two are honest
    assert dist(coordinate_median(ups)) < 0.02
    # trimmed mean, k = 2: drops both attackers and the 2 largest honest values
    assert dist(trimmed_mean(ups, 0.2)) < 0.02
    # Krum (f = 2): the attackers are ~5 ||mu|| from every honest update; Multi-Krum selects the 8 honest ones
    mean, chosen = multi_krum(ups, f=2, m=1)
    assert dist(mean) < 0.02 and chosen[0].startswith("h")
    mean, chosen = multi_krum(ups, f=2, m=8)
    assert dist(mean) < 0.01 and sorted(chosen) == [f"h{i}" for i in range(8)]
    # norm bounding (adaptive, median ~ ||mu||) only shrinks the attack: 0.8 mu - 0.2 mu = 0.6 mu -> distance ~ 0.4
    assert 0.35 < dist(norm_bounded_mean(ups, None)) < 0.45
    # the attackers' norms (4x the median) are flagged at ratio 3
    assert set(norm_outliers(ups, 3.0)) == {"z0", "z1"}
    assert math.isclose(float(flat(attackers[0].delta).norm()), 4 * size, rel_tol=1e-6)
