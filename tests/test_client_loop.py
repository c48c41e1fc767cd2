"""Tests of fedfm.client: LR schedule, local budget, batch order, seeds and the local training loop.

A tiny linear regression stands in for a foundation model: ``task.loss(model, batch)`` is all the
loop needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fedfm.client import batch_order, derive_seed, examples_per_round, lr_at, train
from fedfm.config import TrainConfig
from fedfm.errors import TrainingError
from fedfm.types import ClientTask

# --- lr_at -------------------------------------------------------------------------------------


def lr(progress: float, **kw) -> float:
    return lr_at(progress, TrainConfig(lr=0.1, **kw))


def test_lr_constant():
    for p in (0.0, 0.3, 0.5, 1.0):
        assert lr(p, schedule="constant") == pytest.approx(0.1)


def test_lr_linear():
    # lr * max(0, 1 - p):  p=0 -> 0.1;  p=0.25 -> 0.1*0.75 = 0.075;  p=0.5 -> 0.05;  p=1 -> 0
    assert lr(0.0, schedule="linear") == pytest.approx(0.1)
    assert lr(0.25, schedule="linear") == pytest.approx(0.075)
    assert lr(0.5, schedule="linear") == pytest.approx(0.05)
    assert lr(1.0, schedule="linear") == pytest.approx(0.0, abs=1e-15)


def test_lr_cosine():
    # lr * 0.5 * (1 + cos(pi*p)):  p=0 -> 0.1;  p=1/3 -> 0.1*0.5*(1+0.5) = 0.075;
    # p=0.5 -> 0.1*0.5*(1+0) = 0.05;  p=2/3 -> 0.1*0.5*(1-0.5) = 0.025;  p=1 -> 0
    assert lr(0.0, schedule="cosine") == pytest.approx(0.1)
    assert lr(1 / 3, schedule="cosine") == pytest.approx(0.075)
    assert lr(0.5, schedule="cosine") == pytest.approx(0.05)
    assert lr(2 / 3, schedule="cosine") == pytest.approx(0.025)
    assert lr(1.0, schedule="cosine") == pytest.approx(0.0, abs=1e-15)


def test_lr_warmup_then_linear():
    kw = dict(schedule="linear", warmup_fraction=0.2)
    # warm-up: lr * p / 0.2:  p=0 -> 0;  p=0.1 -> 0.1*0.5 = 0.05
    assert lr(0.0, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr(0.1, **kw) == pytest.approx(0.05)
    # after: rest = (p - 0.2)/0.8;  p=0.2 -> rest 0 -> 0.1;  p=0.6 -> rest 0.5 -> 0.05;  p=1 -> 0
    assert lr(0.2, **kw) == pytest.approx(0.1)
    assert lr(0.6, **kw) == pytest.approx(0.05)
    assert lr(1.0, **kw) == pytest.approx(0.0, abs=1e-15)


def test_lr_warmup_then_cosine():
    kw = dict(schedule="cosine", warmup_fraction=0.25)
    # p=0.125 -> 0.1 * 0.125/0.25 = 0.05
    assert lr(0.125, **kw) == pytest.approx(0.05)
    # p=0.625 -> rest = 0.375/0.75 = 0.5 -> 0.1*0.5*(1+cos(pi/2)) = 0.05
    assert lr(0.625, **kw) == pytest.approx(0.05)
    # p=0.25 -> rest 0 -> 0.1 (peak right after warm-up)
    assert lr(0.25, **kw) == pytest.approx(0.1)


def test_lr_warmup_then_constant():
    kw = dict(schedule="constant", warmup_fraction=0.1)
    # p=0.05 -> 0.1*0.05/0.1 = 0.05;  p=0.5 -> 0.1
    assert lr(0.05, **kw) == pytest.approx(0.05)
    assert lr(0.5, **kw) == pytest.approx(0.1)


# --- examples_per_round ------------------------------------------------------------------------


def test_examples_per_round_epochs():
    assert examples_per_round(10, TrainConfig(local_epochs=1.0)) == 10  # 1 * 10
    assert examples_per_round(10, TrainConfig(local_epochs=2.0)) == 20  # 2 * 10
    assert examples_per_round(10, TrainConfig(local_epochs=0.25)) == 3  # ceil(2.5) = 3
    assert examples_per_round(7, TrainConfig(local_epochs=0.5)) == 4  # ceil(3.5) = 4
    assert examples_per_round(10, TrainConfig(local_epochs=0.01)) == 1  # ceil(0.1) = 1
    assert examples_per_round(10, TrainConfig(local_epochs=None)) == 10  # None -> 1 epoch


def test_examples_per_round_steps_win_over_epochs():
    # local_steps * batch_size = 3 * 4 = 12, whatever local_epochs and n say
    assert examples_per_round(10, TrainConfig(local_steps=3, batch_size=4, local_epochs=5.0)) == 12
    assert examples_per_round(1000, TrainConfig(local_steps=3, batch_size=4)) == 12


def test_examples_per_round_exact_fraction_not_rounded_up_by_float_error():
    # 0.14 epochs of 50 examples = 7 examples exactly; 0.28 of 25 = 7
    assert examples_per_round(50, TrainConfig(local_epochs=0.14)) == 7
    assert examples_per_round(25, TrainConfig(local_epochs=0.28)) == 7


# --- batch_order -------------------------------------------------------------------------------


def test_batch_order_covers_budget_with_permutation_chunks():
    n, budget, bs = 5, 12, 4
    batches = batch_order(n, budget, bs, torch.Generator().manual_seed(3))
    # 12 examples in batches of 4 -> sizes [4, 4, 4]
    assert [len(b) for b in batches] == [4, 4, 4]
    flat = torch.cat(batches)
    assert len(flat) == budget
    # ceil(12/5) = 3 permutations, concatenated and cut at 12: [0:5], [5:10] full perms, [10:12] a distinct pair
    assert sorted(flat[0:5].tolist()) == list(range(5))
    assert sorted(flat[5:10].tolist()) == list(range(5))
    assert len(set(flat[10:12].tolist())) == 2
    assert all(0 <= i < n for i in flat.tolist())


def test_batch_order_last_batch_smaller_and_budget_below_n():
    batches = batch_order(10, 10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]  # 10 = 4 + 4 + 2
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    small = batch_order(10, 3, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in small] == [3]
    assert len(set(small[0].tolist())) == 3


def test_batch_order_seeded():
    a = batch_order(20, 50, 8, torch.Generator().manual_seed(7))
    b = batch_order(20, 50, 8, torch.Generator().manual_seed(7))
    c = batch_order(20, 50, 8, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))


# --- derive_seed -------------------------------------------------------------------------------


def test_derive_seed_deterministic_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(s, r, c) for s in range(3) for r in range(1, 4) for c in range(4)}
    assert len(seeds) == 3 * 3 * 4
    assert derive_seed(0, 1, 2) != derive_seed(0, 2, 1)  # order matters
    s = derive_seed(123, 4, 5)
    assert isinstance(s, int) and 0 <= s < 2**63


# --- train -------------------------------------------------------------------------------------


@dataclass
class Regression:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class RegressionTask:
    @staticmethod
    def batch(data: Regression, idx: torch.Tensor):
        return data.x[idx], data.y[idx]

    @staticmethod
    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


class NaNTask(RegressionTask):
    @staticmethod
    def loss(model, batch):
        x, _ = batch
        return model(x).sum() * float("nan")


def make_data(n: int = 10, seed: int = 0, scale: float = 1.0) -> Regression:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = scale * (x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 1.0)
    return Regression(x, y)


def make_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def init_weights() -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor([[0.1, 0.2, -0.3]]), "bias": torch.tensor([0.05])}


def cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=4, local_epochs=1.0, schedule="constant", max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def run(model=None, data=None, task=None, ctask=None, c=None, seed=0, client_index=0, name="alice", rounds=1):
    return train(
        model or make_model(),
        data if data is not None else make_data(),
        task or RegressionTask(),
        ctask or ClientTask(1, init_weights()),
        c or cfg(),
        rounds,
        seed,
        client_index,
        name,
    )


def test_train_delta_is_new_minus_old():
    model = make_model()
    w0 = init_weights()
    ctask = ClientTask(1, w0)
    u = run(model=model, ctask=ctask)
    assert u.client == "alice"
    assert set(u.delta) == {"weight", "bias"}
    for k, p in model.named_parameters():
        assert torch.equal(u.delta[k], p.detach() - w0[k])
        assert u.delta[k].abs().sum() > 0
    # the server's tensors are not modified by the client
    assert all(torch.equal(ctask.weights[k], v) for k, v in init_weights().items())


def test_train_counts():
    u = run(data=make_data(10))
    assert u.num_examples == 10  # shard size
    # 1 epoch of 10 in batches of 4 -> ceil(10/4) = 3 steps
    assert u.metrics["steps"] == 3
    assert u.metrics["examples_seen"] == 10
    u = run(data=make_data(10), c=cfg(local_epochs=1.5))
    # budget ceil(1.5*10) = 15 -> ceil(15/4) = 4 steps; num_examples still the shard size
    assert (u.metrics["steps"], u.metrics["examples_seen"], u.num_examples) == (4, 15, 10)
    u = run(data=make_data(10), c=cfg(local_steps=5))
    # local_steps 5 * batch 4 = 20 examples -> 5 steps
    assert (u.metrics["steps"], u.metrics["examples_seen"], u.num_examples) == (5, 20, 10)
    u = run(data=make_data(10), ctask=ClientTask(1, init_weights(), num_examples=7))
    # the task's budget wins: 7 examples -> ceil(7/4) = 2 steps
    assert (u.metrics["steps"], u.metrics["examples_seen"], u.num_examples) == (2, 7, 10)


def test_train_reports_scheduled_lr():
    # linear schedule over 2 rounds, round 2 of 2, 3 steps: last step k=2 at progress (1 + 2/3)/2 = 5/6
    # lr = 0.05 * (1 - 5/6) = 0.05/6
    u = run(c=cfg(schedule="linear"), ctask=ClientTask(2, init_weights()), rounds=2)
    assert u.metrics["lr"] == pytest.approx(0.05 / 6)
    assert math.isfinite(u.metrics["train_loss"]) and u.metrics["train_loss"] > 0


def test_train_only_trainable_params():
    model = make_model()
    model.bias.requires_grad_(False)
    bias_before = model.bias.detach().clone()
    u = run(model=model, ctask=ClientTask(1, {"weight": init_weights()["weight"]}))
    assert set(u.delta) == {"weight"}
    assert torch.equal(model.bias.detach(), bias_before)


def test_train_fedprox_keeps_client_near_global():
    # targets far from the model: without the proximal term every step moves the same way
    data = make_data(16, scale=100.0)
    c = cfg(lr=0.1, local_epochs=3.0)  # 48 examples / 4 = 12 steps
    free = run(data=data, c=c, ctask=ClientTask(1, init_weights(), prox_mu=0.0))
    held = run(data=data, c=c, ctask=ClientTask(1, init_weights(), prox_mu=1e6))
    norm = lambda d: float(torch.sqrt(sum((t**2).sum() for t in d.values())))  # noqa: E731
    assert norm(held.delta) < 0.1 * norm(free.delta)  # about 0.03 vs 1.75 here


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # float(loss) in the error message
def test_train_nan_loss_raises_training_error_naming_client():
    with pytest.raises(TrainingError, match="bob") as exc:
        run(task=NaNTask(), name="bob")
    assert "nan" in str(exc.value).lower()


def test_train_empty_shard_raises():
    with pytest.raises(TrainingError, match="carol"):
        run(data=Regression(torch.zeros(0, 3), torch.zeros(0, 1)), name="carol")


def test_train_clips_gradients(monkeypatch):
    orig = torch.nn.utils.clip_grad_norm_
    calls = []

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        out = orig(parameters, max_norm, *args, **kwargs)
        after = torch.sqrt(sum((p.grad**2).sum() for p in parameters))
        calls.append((max_norm, float(after)))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    u = run(data=make_data(10, scale=100.0), c=cfg(max_grad_norm=1e-3))
    assert len(calls) == u.metrics["steps"] == 3  # once per step
    for max_norm, after in calls:
        assert max_norm == 1e-3
        assert after <= 1e-3 * (1 + 1e-4)  # gradients really were clipped
    calls.clear()
    run(c=cfg(max_grad_norm=None))
    assert calls == []  # off -> never called


def test_train_is_deterministic_given_seed():
    a = run(seed=11, client_index=2)
    b = run(seed=11, client_index=2)
    for k in a.delta:
        assert torch.equal(a.delta[k], b.delta[k])  # bitwise
    assert a.metrics == b.metrics
    c = run(seed=12, client_index=2)  # a different seed shuffles differently
    assert any(not torch.equal(a.delta[k], c.delta[k]) for k in a.delta)


def test_kept_optimizer_state_makes_two_rounds_one_continuous_adamw_run():
    """train.keep_optimizer_state: two rounds of 3 steps, the second starting from the first's weights and AdamW
    state, are one AdamW run of 6 steps over the same batches (the reference is torch's own AdamW, stepped by hand).
    Without the state the second round restarts AdamW (bias correction from step 1) and ends elsewhere."""
    data, c = make_data(12), cfg(local_steps=3, weight_decay=0.01)
    model = make_model()
    first = train(model, data, RegressionTask(), ClientTask(1, init_weights()), c, 2, 5, 1, "a", optimizer_state={})
    assert set(first.optimizer) == {f"{p}.{k}" for p in ("m", "v", "step") for k in ("weight", "bias")}
    assert first.optimizer["step.bias"].item() == 3
    w1 = {k: init_weights()[k] + d for k, d in first.delta.items()}
    second = train(model, data, RegressionTask(), ClientTask(2, w1), c, 2, 5, 1, "a", optimizer_state=first.optimizer)
    fresh = train(model, data, RegressionTask(), ClientTask(2, w1), c, 2, 5, 1, "a")
    assert second.optimizer["step.weight"].item() == 6 and fresh.optimizer is None

    ref = make_model()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(init_weights()[k])
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.01)
    for r in (1, 2):
        for idx in batch_order(12, 12, 4, torch.Generator().manual_seed(derive_seed(5, r, 1)))[:3]:
            RegressionTask.loss(ref, RegressionTask.batch(data, idx)).backward()
            opt.step()
            opt.zero_grad()
    for k, p in ref.named_parameters():
        assert torch.allclose(w1[k] + second.delta[k], p.detach(), atol=1e-7)
        assert not torch.allclose(w1[k] + fresh.delta[k], p.detach(), atol=1e-4)
