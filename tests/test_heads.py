"""Methods for label-pure and few-class owners (FedRS, FedAwS, FedETF, CCVR): the arithmetic on small tensors against
numbers worked by hand (or torch's own covariance), then one tiny run of each on real MiniLM and BBC."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedfm import config as config_mod
from fedfm import heads, server
from fedfm.app import App
from fedfm.errors import ConfigError
from fedfm.heads import ClassStats


def test_restricted_logits_by_hand():
    # logits [1, 2, 3], bias [0.5, 0, 0]; class 1 absent, alpha 0.5:
    # class 0: (1 - 0.5) * 1 + 0.5 = 1; class 1: (2 - 0) * 0.5 + 0 = 1; class 2: 3 (present)
    out = heads.restricted_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([0.5, 0.0, 0.0]),
                                  torch.tensor([True, False, True]), 0.5)
    assert out.tolist() == [[1.0, 1.0, 3.0]]
    same = heads.restricted_logits(torch.tensor([[1.0, 2.0]]), None, torch.tensor([True, False]), 1.0)
    assert same.tolist() == [[1.0, 2.0]]  # alpha 1 is plain softmax


def test_simplex_etf_is_equiangular_and_centred():
    m = heads.simplex_etf(4, 6, seed=0)
    assert m.shape == (4, 6)
    gram = m @ m.T  # unit rows, pairwise cosine -1/(C-1) = -1/3
    assert torch.allclose(gram.diagonal(), torch.ones(4), atol=1e-6)
    off = gram[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 3), atol=1e-6)
    assert torch.allclose(m.sum(0), torch.zeros(6), atol=1e-6)  # (I - 11^T/C) sums the class vectors to zero
    assert torch.equal(m, heads.simplex_etf(4, 6, seed=0))
    with pytest.raises(ConfigError, match="feature size"):
        heads.simplex_etf(5, 4, seed=0)


def test_etf_loss_by_hand():
    # h = [2, 0] normalises to [1, 0]; class vectors e1, e2; scale 2: logits [2, 0]; CE(label 0) = log(1 + e^-2)
    loss = heads.etf_loss(torch.tensor([[2.0, 0.0]]), torch.eye(2), torch.tensor([0]), 2.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_positive_loss_and_spreadout_by_hand():
    # cos([1, 0], [1, 1]) = 1/sqrt(2); (0.9 - 0.70711)^2 = 0.037204; class 1's vector plays no part
    loss = heads.positive_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0], [5.0, -3.0]]), torch.tensor([0]), 0.9)
    assert float(loss) == pytest.approx((0.9 - 1 / math.sqrt(2)) ** 2, abs=1e-6)
    # two equal unit rows at distance 0, margin 1: two ordered pairs of (1 - 0)^2
    assert float(heads.spreadout(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 1.0)) == pytest.approx(2.0)
    assert float(heads.spreadout(torch.eye(2), 1.0)) == 0.0  # sqrt(2) apart: nothing to push
    w = heads.spread_out(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), margin=2.0, steps=20, lr=0.05)
    assert torch.allclose(w.norm(dim=1), torch.ones(2), atol=1e-6)
    assert float(w[0] @ w[1]) < 0.8  # the two class vectors moved apart (cosine was 0.8)


def test_label_skew_hint_by_hand():
    # shares of the largest class: [1.0, 1.0] -> mean 1.0 warns; [0.5, 2/3] -> mean 0.58 does not
    assert "recipe: label_skew" in heads.label_skew_hint([torch.tensor([0, 0]), torch.tensor([1, 1, 1])], 2)
    assert heads.label_skew_hint([torch.tensor([0, 1]), torch.tensor([0, 1, 1])], 2) is None
    assert heads.label_skew_hint([], 3) is None


def test_pooled_class_stats_equal_the_pooled_features():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)
    owners = [torch.arange(0, 7), torch.arange(7, 19), torch.arange(19, 30)]  # one owner holds three classes' rows
    parts = [heads.class_stats(h[i], labels[i], 3) for i in owners]
    pooled = heads.pool_stats(parts)
    whole = heads.class_stats(h, labels, 3)  # torch.cov over each class's pooled features: the reference
    assert torch.equal(pooled.counts, whole.counts)
    assert torch.allclose(pooled.means, whole.means, atol=1e-12)
    assert torch.allclose(pooled.covs, whole.covs, atol=1e-12)


def test_calibration_separates_classes_from_their_statistics():
    means = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]], dtype=torch.float64)
    stats = ClassStats(torch.tensor([50.0, 50.0, 50.0], dtype=torch.float64), means,
                       torch.eye(2, dtype=torch.float64).repeat(3, 1, 1) * 0.25)
    w0, b0 = torch.zeros(3, 2), torch.zeros(3)  # a head that predicts nothing
    w, b = heads.calibrate(w0, b0, stats, samples=100, steps=200, lr=0.1, seed=0)
    assert ((means.float() @ w.T + b).argmax(1) == torch.arange(3)).all()
    assert torch.equal(w0, torch.zeros(3, 2))  # the input head is not changed in place


# --- tiny runs: each method end to end on real MiniLM and BBC, owners holding one class each -------------------
LABEL_PURE = [
    "name=h", "seed=1", "rounds=2", "data.source=bbc", "data.max_examples=200", "data.partition=pathological",
    "data.classes_per_client=1", "data.max_length=32", "federation.num_clients=5", "train.local_steps=2",
    "train.batch_size=8", "train.lr=0.003", "eval.max_examples=40", "compare.methods=[federated]",
]


def run(tmp_path, *extra):
    cfg = config_mod.load(None, [*LABEL_PURE, f"output_dir={tmp_path}", *extra])
    app = App(cfg)
    run_dir = tmp_path / "run"
    server.run_method(app, "federated", run_dir)
    return app, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["fedrs", "fedaws"])
def test_head_losses_train_end_to_end(tmp_path, loss):
    app, run_dir, summary = run(tmp_path, f"head.loss={loss}")
    assert math.isfinite(summary["global"]["loss"]) and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    head = heads.head_of(app.model)
    if loss == "fedaws":  # the server leaves the class vectors unit length after its spreadout steps
        assert torch.allclose(head.linear.weight.norm(dim=1), torch.ones(5), atol=1e-5)


@pytest.mark.slow
def test_fedetf_head_is_fixed_never_sent_and_saved(tmp_path):
    app, run_dir, summary = run(tmp_path, "head.loss=fedetf")
    head = heads.head_of(app.model)
    assert head.weight_name == "" and not any("classifier" in n for n in app.initial_weights)  # not trained, not sent
    assert torch.allclose(head.linear.weight, heads.simplex_etf(5, head.linear.in_features, 1), atol=1e-6)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2 and math.isfinite(summary["global"]["loss"])


@pytest.mark.slow
def test_recipe_fedetf_head_moves_only_by_ccvr_at_the_end(tmp_path):
    cfg = config_mod.load(None, [*LABEL_PURE, f"output_dir={tmp_path}", "recipe=label_skew", "head.ccvr_steps=20"])
    assert (cfg.head.loss, cfg.head.calibrate) == ("fedetf", "ccvr")
    app = App(cfg)
    head = heads.head_of(app.model)
    etf = heads.simplex_etf(5, head.linear.in_features, 1)
    assert torch.allclose(app.initial_weights[head.weight_name], etf, atol=1e-6)  # trainable, starts as the ETF
    sent = []
    train = app.client_train
    app.client_train = lambda i, t: (u := train(i, t), sent.append(u.delta[head.weight_name].clone()))[0]
    server.run_method(app, "federated", tmp_path / "run")
    assert sent and all(float(d.abs().max()) == 0.0 for d in sent)  # no client moved the ETF
    assert not torch.allclose(head.linear.weight, etf, atol=1e-3)  # CCVR retrained it after the last round


@pytest.mark.slow
def test_ccvr_recalibrates_the_head_at_the_last_round(tmp_path):
    app, run_dir, summary = run(tmp_path, "head.calibrate=ccvr", "head.ccvr_steps=50")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("ccvr_owners") for r in rounds if r.get("method", "federated") == "federated"][-1] == 5
    assert "ccvr_owners" not in rounds[0]  # only after the last round
    # the owner's reply is the statistics of its own features, which the server can check
    head = heads.head_of(app.model)
    feature = next(f for f in app.features if f.name == "head.calibrate=ccvr")
    from fedfm import codec
    from fedfm.models import get_weights

    stats = feature.parse(feature.reply(0, codec.encode(get_weights(app.model))))
    assert stats is not None and stats.means.shape == (5, head.linear.in_features)
    assert int((stats.counts > 0).sum()) == 1  # a label-pure owner: one class, and its statistics say which
    assert feature.parse(b"not a message") is None


@pytest.mark.parametrize("extra, match", [
    (["head.loss=fedrs", "train.logit_adjustment=true"], "each replaces the clients' loss"),
    (["head.calibrate=ccvr", "secagg.enabled=true", "federation.min_clients=2", "compare.methods=[federated]"], "feature mean and covariance"),
    (["head.loss=fedaws", "dpsgd.enabled=true", "compare.methods=[federated]"], "per-example"),
    (["head.loss=fedrs", "task=causal_lm", "data.source=shakespeare"], "classification head"),
    (["recipe=label_skew", "personal.method=fedper", "compare.methods=[federated]"], "never train"),
])
def test_head_methods_refuse_what_they_cannot_join(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.load(None, [f"output_dir={tmp_path}", *extra])


def test_fedrs_loss_is_cross_entropy_of_restricted_logits():
    logits, labels = torch.tensor([[0.3, 1.2, -0.4]]), torch.tensor([0])
    present = torch.tensor([True, False, False])
    out = heads.restricted_logits(logits, torch.zeros(3), present, 0.0)  # alpha 0: absent classes score 0
    assert float(F.cross_entropy(out, labels)) == pytest.approx(math.log(math.exp(0.3) + 2) - 0.3, abs=1e-6)
