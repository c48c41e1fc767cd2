"""Example-level DP-SGD (Opacus) inside fedfm's client loop, on a peft LoRA adapter.

Reference for correctness: with noise 0 and a clipping bound no gradient reaches, DP-SGD's update is
the mean of per-example gradients, i.e. the ordinary batch gradient, so the client's update must equal
the non-DP loop's (float tolerance: a sum of per-example gradients vs one batched gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedfm.client import train
from fedfm.config import DPSGDConfig, TrainConfig
from fedfm.models import get_weights
from fedfm.privacy import dp
from fedfm.privacy.dpsgd import poisson_batches
from fedfm.types import ClientTask


@dataclass
class Labelled:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class Task:
    @staticmethod
    def batch(data, idx):
        return data.x[idx], data.y[idx]

    @staticmethod
    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lora_model():
    """A small MLP with a real peft LoRA adapter (and a trainable head copy, peft's modules_to_save)."""
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"]))
    for p in model.parameters():  # LoRA's B starts at zero; move it so the adapter's gradients are all non-trivial
        if p.requires_grad:
            p.data.add_(0.05)
    model.start = get_weights(model)  # every client round in a test starts here
    return model


def data(n=48):
    g = torch.Generator().manual_seed(1)
    return Labelled(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def client_round(model, dpsgd, steps=3, batch=8):
    """One client round from the model's first weights (every call starts from the same point)."""
    c = TrainConfig(lr=0.01, batch_size=batch, local_steps=steps, schedule="constant", max_grad_norm=None)
    task = ClientTask(1, model.start)
    return train(model, data(), Task(), task, c, rounds=1, seed=0, client_index=0, client_name="a", dpsgd=dpsgd)


def test_dpsgd_with_noise_0_and_no_clipping_equals_the_plain_loop():
    model = lora_model()
    plain = client_round(model, None)
    off = DPSGDConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=1e9, poisson=False)
    private = client_round(model, off)
    assert plain.delta.keys() == private.delta.keys()
    assert any("lora_A" in k for k in private.delta) and any("modules_to_save" in k for k in private.delta)
    for k in plain.delta:
        assert torch.allclose(plain.delta[k], private.delta[k], atol=1e-6, rtol=1e-4), k
        assert plain.delta[k].abs().max() > 0
    # the hooks are gone: the shared model trains exactly as before afterwards
    again = client_round(model, None)
    assert all(torch.equal(again.delta[k], plain.delta[k]) for k in plain.delta)
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def test_dpsgd_clipping_and_noise_change_the_update():
    model = lora_model()
    plain = client_round(model, None)
    clipped = client_round(model, DPSGDConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=1e-3, poisson=False))
    noisy = client_round(model, DPSGDConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, poisson=True))
    assert dp.global_norm(clipped.delta) > 0
    assert any(not torch.allclose(plain.delta[k], clipped.delta[k]) for k in plain.delta)
    assert any(not torch.allclose(plain.delta[k], noisy.delta[k]) for k in plain.delta)
    assert noisy.metrics["dpsgd_q"] == pytest.approx(8 / 48)
    # seeded: the same round repeats bit for bit
    repeat = client_round(model, DPSGDConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, poisson=True))
    assert all(torch.equal(repeat.delta[k], noisy.delta[k]) for k in noisy.delta)


def test_poisson_batches_rate_and_empty_batch_still_steps():
    g = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in poisson_batches(1000, 200, 0.05, g)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)  # E|batch| = q n = 50
    # q so small that batches are empty: each step still moves the adapter by pure noise (never a skipped step)
    model = lora_model()
    c = TrainConfig(lr=0.01, batch_size=1, local_steps=2, schedule="constant", max_grad_norm=None)
    tiny = Labelled(torch.randn(200, 6), torch.zeros(200, dtype=torch.long))
    cfg = DPSGDConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, poisson=True)
    up = train(model, tiny, Task(), ClientTask(1, get_weights(model)), c, 1, 7, 0, "a", dpsgd=cfg)
    assert dp.global_norm(up.delta) > 0


def test_example_epsilon_matches_opacus():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    assert dp.poisson_epsilon(1000, 0.01, 1.0, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
