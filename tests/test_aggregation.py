"""The aggregation seam: streaming folds, the in-order release of arrivals, the spool that keeps updates within a
memory budget, aggregator x server optimizer from the config, q-FedAvg, and capability rules.

Every expected number is worked out by hand in a comment next to it.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tensors import T, close, upd
from test_e2e import final_state, tiny

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.aggregators.base import FoldContext, InOrder
from fedfm.aggregators.mean import Mean, MeanFold
from fedfm.aggregators.qfedavg import QFedAvg
from fedfm.aggregators.robust import Krum, Median
from fedfm.errors import ConfigError
from fedfm.registry import build_aggregation
from fedfm.server_opt.sgd import Momentum
from fedfm.store import UpdateSpool
from fedfm.types import ClientUpdate

SMOKE = "configs/smoke.yaml"


def fold(aggregator, updates, ctx=None):
    f = aggregator.start(ctx)
    for u in updates:
        f.add(u)
    return f.result()


# --- the mean, streamed --------------------------------------------------------------------------------------------


def test_mean_fold_keeps_running_sums():
    # (1*[1, 2] + 3*[5, 6]) / 4 = [16/4, 20/4] = [4, 5]
    agg = fold(Mean(), [upd("a", 1, x=T(1, 2)), upd("b", 3, x=T(5, 6))])
    close(agg.delta["x"], [4.0, 5.0])
    assert (agg.weight, agg.count) == (4.0, 2)


def test_mean_fold_divides_first_and_rescales_when_a_client_is_missing():
    a, b = upd("a", 1, x=T(0.1, 0.7)), upd("b", 3, x=T(0.3, 0.9))
    full = MeanFold(expected=4.0)
    for u in (a, b):
        full.add(u)
    # every sampled client reported: exactly sum_i (n_i / N) delta_i, added in this order, as fedfm always did
    want = torch.zeros(2).add_(T(0.1, 0.7), alpha=1 / 4).add_(T(0.3, 0.9), alpha=3 / 4)
    assert torch.equal(full.result().delta["x"], want)
    # a third client (n = 6) was expected but vanished: N = 10 rescaled to the 4 that came, the same mean
    part = MeanFold(expected=10.0)
    for u in (a, b):
        part.add(u)
    close(part.result().delta["x"], [(0.1 + 3 * 0.3) / 4, (0.7 + 3 * 0.9) / 4], atol=1e-7)


def test_in_order_release_gives_the_same_bits_whatever_the_arrival_order():
    g = torch.Generator().manual_seed(0)
    ups = [upd(f"c{i}", float(i + 1), x=torch.randn(1000, generator=g) * 10 ** (i % 4)) for i in range(8)]
    sums = set()
    for seed in range(5):
        arrival = list(range(8))
        random.Random(seed).shuffle(arrival)
        order, f = InOrder(list(range(8))), Mean().start()
        for i in arrival:
            for u in order.arrive(i, ups[i]):
                f.add(u)
        assert order.held == 0
        sums.add(f.result().delta["x"].numpy().tobytes())
    assert len(sums) == 1  # float sums in one fixed order: the same bits every time


def test_in_order_holds_early_arrivals_and_flushes_past_a_client_that_never_came():
    order = InOrder([0, 1, 2, 3])
    assert list(order.arrive(2, "c2")) == []  # 0 and 1 not in yet
    assert order.held == 1
    assert list(order.arrive(0, "c0")) == ["c0"]
    assert list(order.arrive(1, None)) == ["c2"]  # 1 sent nothing usable: 2 is released behind it
    assert list(order.flush()) == []  # 3 never came
    order = InOrder([0, 1, 2])
    assert list(order.arrive(2, "c2")) == []
    assert list(order.flush()) == ["c2"]  # 0 and 1 vanished: what waited is folded at the end of the round


# --- the spool -----------------------------------------------------------------------------------------------------


def test_spool_spills_past_its_budget_and_reads_back_per_tensor(tmp_path):
    spool = UpdateSpool(memory_bytes=3 * 4, directory=tmp_path / "spool")  # room for 3 float32 values
    spool.put("a", {"x": T(1, 2), "y": T(3)})  # 12 bytes: in memory
    spool.put("b", {"x": T(4, 5), "y": T(6)})  # over the budget: to disk
    assert (spool.used, spool.spilled, len(spool)) == (12, 1, 2)
    close(spool.tensor("b", "x"), [4.0, 5.0])
    assert dict(spool.delta("b")).keys() == {"x", "y"} and float(spool.delta("b")["y"]) == 6.0
    with pytest.raises(KeyError, match="already in the spool"):
        spool.put("b", {"x": T(0)})
    spool.close()
    assert not (tmp_path / "spool").exists() and len(spool) == 0


@pytest.mark.parametrize("aggregator", [Median(), Krum(0.25, 1)], ids=["median", "krum"])
def test_kept_updates_on_disk_aggregate_as_in_memory(tmp_path, aggregator):
    g = torch.Generator().manual_seed(1)
    ups = [upd(f"c{i}", 1.0, x=torch.randn(6, generator=g), y=torch.randn(2, 3, generator=g)) for i in range(5)]
    in_memory = fold(aggregator, ups)
    ctx = FoldContext(1, {"x": torch.zeros(6), "y": torch.zeros(2, 3)},
                      spool=lambda: UpdateSpool(memory_bytes=0, directory=tmp_path / "s"))  # every update spilled
    on_disk = fold(aggregator, ups, ctx)
    assert all(torch.equal(in_memory.delta[k], on_disk.delta[k]) for k in ("x", "y"))
    assert not (tmp_path / "s").exists()  # the round's spill files are gone with the round


# --- aggregator x server optimizer ---------------------------------------------------------------------------------


def test_a_robust_aggregator_with_server_momentum_from_the_config():
    cfg = config_mod.load(SMOKE, ["strategy.aggregator=median", "strategy.server_opt=momentum",
                                  "strategy.momentum=0.5", "strategy.server_lr=1.0"])
    aggregator, optimizer, _ = build_aggregation(cfg, 3)
    assert isinstance(aggregator, Median) and optimizer == Momentum(1.0, 0.5)
    w = {"x": T(0.0)}
    opt = optimizer.init(w)
    ups = [upd("a", 1, x=T(1.0)), upd("b", 100, x=T(2.0)), upd("c", 1, x=T(9.0))]
    # round 1: median(1, 2, 9) = 2 (the example counts do not move it); v = 0.5*0 + 2 = 2; w = 0 + 2 = 2
    w, opt = optimizer.step(w, opt, fold(aggregator, ups).delta)
    close(w["x"], [2.0])
    # round 2: the same updates; v = 0.5*2 + 2 = 3; w = 2 + 3 = 5
    w, opt = optimizer.step(w, opt, fold(aggregator, ups).delta)
    close(w["x"], [5.0])
    close(opt["v.x"], [3.0])


def test_a_named_strategy_keeps_meaning_what_it_meant():
    cfg = config_mod.load(SMOKE, ["strategy.name=fedavgm", "strategy.momentum=0.5"])
    aggregator, optimizer, _ = build_aggregation(cfg, 3)
    assert isinstance(aggregator, Mean) and optimizer == Momentum(1.0, 0.5)


# --- q-FedAvg: the proof that a new aggregator is one module and one registry line -----------------------------------


def loss_upd(client: str, loss: float, n: float, x: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(client=client, delta={"x": x}, num_examples=n, metrics={"train_loss": loss})


def test_qfedavg_by_hand():
    # q=1, L=1, delta_a=[1], F_a=1; delta_b=[3], F_b=4
    # Delta = F^q L delta: 1*1 + 4*3 = 13;  h = q F^(q-1) L^2 ||delta||^2 + L F^q: (1 + 1) + (9 + 4) = 15
    ups = [loss_upd("a", 1.0, 10, T(1.0)), loss_upd("b", 4.0, 1, T(3.0))]
    close(fold(QFedAvg(q=1.0, lipschitz=1.0), ups).delta["x"], [13 / 15])
    # q=0: Delta = L delta, h = L: (1 + 3) / 2 = 2, the unweighted mean (example counts 10 and 1 play no part)
    close(fold(QFedAvg(q=0.0, lipschitz=7.0), ups).delta["x"], [2.0])


def test_qfedavg_refuses_an_update_without_a_loss_and_keeps_the_rest():
    ups = [loss_upd("a", 1.0, 1, T(1.0)), loss_upd("b", float("nan"), 1, T(100.0))]
    agg = fold(QFedAvg(q=1.0, lipschitz=1.0), ups)
    close(agg.delta["x"], [0.5])  # only a: 1*1*1 / (1*1*1 + 1*1) = 1/2
    assert agg.count == 1 and agg.rejected[0]["client"] == "b"


def test_qfedavg_from_the_config_takes_lipschitz_from_the_learning_rate():
    cfg = config_mod.load(SMOKE, ["strategy.aggregator=qfedavg", "strategy.q=2", "train.lr=0.01"])
    aggregator, _, _ = build_aggregation(cfg, 3)
    assert aggregator == QFedAvg(q=2.0, lipschitz=100.0)  # the paper's L = 1 / lr


def test_qfedavg_is_refused_where_the_server_sees_only_a_sum():
    with pytest.raises(ConfigError, match=r"strategy.aggregator=qfedavg.*secagg|secagg.*strategy.aggregator=qfedavg"):
        config_mod.load(SMOKE, ["strategy.aggregator=qfedavg", "secagg.enabled=true", "federation.min_clients=2"])


def test_qfedavg_runs_end_to_end(tmp_path):
    cfg = tiny(tmp_path, "strategy.aggregator=qfedavg", "strategy.q=1")
    run_dir = server.run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, cfg.rounds + 1))
    assert all(r["rejected"] == [] and len(r["clients"]) == r["sampled"] for r in records)
    start, end = App(cfg).initial_weights, final_state(run_dir)
    assert all(torch.isfinite(end[f"w/{k}"]).all() for k in start)  # checkpoint tensors: w/<name>
    assert any(not torch.equal(start[k], end[f"w/{k}"]) for k in start)
