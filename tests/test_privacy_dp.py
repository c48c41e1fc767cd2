"""Client-level DP (clipping, adaptive clipping, accounting), composition rules and the Median strategy."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm import config
from fedfm.errors import ConfigError
from fedfm.privacy import dp
from fedfm.aggregators.robust import coordinate_median
from fedfm.types import ClientUpdate


def test_clip_bound_holds_and_small_updates_are_untouched():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.1, 10.0, 1e3):
        delta = {"a": torch.randn(7, 5, generator=g) * scale, "b": torch.randn(11, generator=g) * scale}
        clipped, norm = dp.clip(delta, 1.0)
        assert norm == pytest.approx(math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values())))
        assert dp.global_norm(clipped) <= 1.0 + 1e-6
        if norm <= 1.0:
            assert all(torch.equal(clipped[k], delta[k]) for k in delta)
        else:  # scaled, direction kept: clipped = delta * (1 / norm)
            assert torch.allclose(clipped["a"], delta["a"] / norm, rtol=1e-5)


def test_clip_by_hand():
    # ||(3, 4)|| = 5; clipped to 1 -> (0.6, 0.8)
    clipped, norm = dp.clip({"w": torch.tensor([3.0, 4.0])}, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8]))


def test_adaptive_clipping_by_hand():
    # Andrew et al. 2021: C <- C * exp(-lr * (b - gamma)); 70% unclipped vs target 50%, lr 0.2 -> C * e^-0.04
    assert dp.next_clip_norm(1.0, 0.7, 0.5, 0.2) == pytest.approx(math.exp(-0.04))
    assert dp.next_clip_norm(2.0, 0.3, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.04))
    # z = 1, sigma_b = 1: z_u = (1 - (2*1)^-2)^-1/2 = (3/4)^-1/2 = 1.1547
    assert dp.update_noise_multiplier(1.0, 1.0) == pytest.approx((3 / 4) ** -0.5)
    assert dp.update_noise_multiplier(1.0, None) == 1.0
    with pytest.raises(ConfigError, match="clip_count_stddev"):
        dp.update_noise_multiplier(1.0, 0.4)  # needs > z/2


def test_epsilon_equals_the_library_accountants():
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    for q, z, rounds in [(0.2, 1.0, 20), (0.1, 0.8, 50), (0.05, 1.5, 100)]:
        sampling = dp.Sampling("poisson", 1000, q * 1000)
        ours = dp.epsilon(rounds, sampling, z, 1e-5)
        # 1) Google's dp-accounting, called directly: the same number
        acc = RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
        assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
        # 2) Opacus's independent RDP implementation (a different grid of orders): within 1%
        op = RDPAccountant()
        op.history = [(z, q, rounds)]
        assert ours == pytest.approx(op.get_epsilon(1e-5), rel=0.01)
    # epsilon grows with rounds and falls with noise
    s = dp.Sampling("poisson", 100, 20)
    assert dp.epsilon(10, s, 1.0, 1e-5) < dp.epsilon(20, s, 1.0, 1e-5)
    assert dp.epsilon(20, s, 2.0, 1e-5) < dp.epsilon(20, s, 1.0, 1e-5)
    assert dp.epsilon(0, s, 1.0, 1e-5) == 0.0 and dp.epsilon(5, s, 0.0, 1e-5) == math.inf


def test_fixed_size_sampling_is_accounted_under_replace_one():
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # replacing one client moves the clipped sum by 2C: noise z*C is z/2 sensitivities
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(100, 20, dp_event.GaussianDpEvent(0.5)), 20)
    assert dp.epsilon(20, dp.Sampling("fixed", 100, 20), 1.0, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))


def test_rounds_within_budget():
    s = dp.Sampling("poisson", 100, 20)
    k = dp.rounds_within(5.0, s, 1.0, 1e-5, "rdp", 100)
    assert dp.epsilon(k, s, 1.0, 1e-5) <= 5.0 < dp.epsilon(k + 1, s, 1.0, 1e-5)


def test_median_by_hand():
    ups = [ClientUpdate(f"c{i}", {"w": torch.tensor([v, -v])}, 1) for i, v in enumerate([1.0, 5.0, 2.0])]
    assert torch.equal(coordinate_median(ups)["w"], torch.tensor([2.0, -2.0]))
    ups.append(ClientUpdate("c9", {"w": torch.tensor([100.0, 0.0])}, 1))  # even count: mean of the middle two
    assert torch.equal(coordinate_median(ups)["w"], torch.tensor([3.5, -1.5]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dp.mode=distributed"], "needs secagg.enabled"),
        (["secagg.enabled=true", "federation.min_clients=2", "strategy.name=median"], "needs individual client updates"),
        (["dp.mode=central", "strategy.name=median"], "needs individual client updates"),
        (["dp.mode=central"], "no DP guarantee beside a DP run"),
        (["dpsgd.enabled=true", "compare.methods=[local]"], "no DP guarantee"),
        (["secagg.enabled=true", "federation.min_clients=2", "compare.methods=[federated]", "train.logit_adjustment=true"], "label counts"),
        (["dpsgd.enabled=true", "compare.methods=[federated]", "strategy.name=fedprox"], "proximal term"),
        (["dp.target_epsilon=4"], "needs dp.mode"),
        (["dp.mode=central", "dp.accountant=pld", "compare.methods=[federated]"], "poisson only"),
        (["secagg.enabled=true"], "min_clients >= 2"),
        (["dp.mode=central", "compare.methods=[federated]", "server_data.fraction=0.1", "server_data.steps=1"], "server_data.weight"),
        # Algorithm 2 after aggregation would weigh the server against a count of reporters, not of examples
        (["dp.mode=central", "compare.methods=[federated]", "server_data.fraction=0.1", "server_data.steps=1",
          "server_data.when=after"], "server_data.weight"),
        (["dpsgd.enabled=true", "compare.methods=[federated]", "train.logit_adjustment=true"], "label counts"),
        (["server_data.fraction=0.1", "server_data.steps=1", "strategy.name=median"], "ignores the server pseudo-client"),
        (["dp.mode=sometimes"], "dp.mode"),
    ],
)
def test_composition_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_valid_private_configs_load():
    cfg = config.load(
        None,
        ["dp.mode=distributed", "secagg.enabled=true", "secagg.neighbours=4", "federation.min_clients=3",
         "federation.sampling=poisson", "compare.methods=[federated]", "dp.target_epsilon=8"],
    )
    assert cfg.dp.active and cfg.secagg.enabled and cfg.federation.sampling == "poisson"


def test_attack_summaries_by_hand():
    import numpy as np

    from fedfm.privacy.audit import lira_offline, roc_summary

    # perfectly separated scores: AUC 1, every member found at 0% false positives
    r = roc_summary("x", np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]))
    assert r.auc == 1.0 and r.tpr_at_1pct_fpr == 1.0
    # members 2 and 4 vs non-members 1 and 3: pairs (m > n) = (2>1, 4>1, 4>3) = 3 of 4 -> AUC 0.75;
    # at FPR 0 only the member scoring 4 is above every non-member -> TPR 1/2
    r = roc_summary("x", np.array([2.0, 4.0]), np.array([1.0, 3.0]))
    assert r.auc == 0.75 and r.tpr_at_1pct_fpr == 0.5
    # LiRA offline: shadows' phi [[0, 2], [2, 4]] -> mean (1, 3), std per example sqrt(2) -> global sqrt(2)
    scores = lira_offline(np.array([1.0 + 2**0.5, 3.0]), np.array([[0.0, 2.0], [2.0, 4.0]]))
    assert scores == pytest.approx([1.0, 0.0])
