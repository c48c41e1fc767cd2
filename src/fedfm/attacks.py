"""Simulated Byzantine clients: pure functions that poison an update or a client's data.

The simulator applies them to a seeded, fixed set of clients (``byzantine_clients``) so that the robust strategies
(fedfm.strategies.robust) are measured against an adversary rather than assumed to work.

Update attacks (the client trains honestly, then changes what it sends):

- ``sign_flip``: send ``-scale * delta``, pushing the global model against the honest direction (the "reversed
  gradient" / inner-product-manipulation adversary of Damaskinos et al. 2018 and Karimireddy et al. 2021).
- ``scaling``: send ``scale * delta``, so the attacker's update dominates the mean: model replacement (Bagdasaryan et
  al. 2020, "How to backdoor federated learning").
- ``noise``: replace the update by Gaussian noise N(0, noise_std^2) of the same shapes (a random Byzantine update,
  as in Blanchard et al. 2017).

Data attacks (the client trains honestly on poisoned data):

- ``label_flip``: y -> num_labels - 1 - y (Tolpegin et al. 2020, "Data poisoning attacks against federated learning
  systems").
- ``backdoor``: append a trigger phrase to some examples and relabel them with a target class (Gu et al. 2017,
  BadNets; Bagdasaryan et al. 2020); ``backdoor_success`` measures how often the trigger flips a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedfm.types import Weights

ATTACKS = ("none", "sign_flip", "scaling", "noise", "label_flip", "backdoor")
UPDATE_ATTACKS = ("sign_flip", "scaling", "noise")
DATA_ATTACKS = ("label_flip", "backdoor")


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """A seeded fixed set of floor(fraction * num_clients + 0.5) client indices in [0, num_clients) (seed >= 0)."""
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"Byzantine fraction must be in [0, 1], got {fraction}")
    count = math.floor(fraction * num_clients + 0.5)
    if count == 0:
        return frozenset()
    rng = np.random.default_rng(seed ^ 0xBAD)
    return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def default_scale(kind: str) -> float:
    """The attack's default multiplier: sign_flip 4, scaling 30; 1 for attacks that take no scale.

    With 20% attackers sending -4 x the honest update, the FedAvg mean is 0.8 - 0.2 * 4 = 0 times the honest
    direction: training stalls. Sending 30 x makes the attackers' 0.2 * 30 = 6 outweigh the honest 0.8 by 7.5 to 1.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
    return {"sign_flip": 4.0, "scaling": 30.0}.get(kind, 1.0)


def poison_update(delta: Weights, kind: str, scale: float, noise_std: float, generator: torch.Generator) -> Weights:
    """The update a Byzantine client sends instead of ``delta`` (new tensors; ``delta`` is untouched).

    sign_flip: -scale * delta; scaling: scale * delta; noise: N(0, noise_std^2) of the same shapes, drawn from
    ``generator`` in sorted-key order (so reproducible from the generator's seed).
    """
    if kind == "sign_flip":
        return {k: -scale * t.float() for k, t in delta.items()}
    if kind == "scaling":
        return {k: scale * t.float() for k, t in delta.items()}
    if kind == "noise":
        drawn = {
            k: torch.randn(delta[k].shape, generator=generator, dtype=torch.float32) * noise_std for k in sorted(delta)
        }
        return {k: drawn[k] for k in delta}
    raise ValueError(f"{kind!r} is not an update attack; choose one of {', '.join(UPDATE_ATTACKS)}")


def flip_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """y -> num_labels - 1 - y (Tolpegin et al. 2020), as a new tensor; negative labels (ignore indices) are kept."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    labels = torch.as_tensor(labels)
    return torch.where(labels >= 0, num_labels - 1 - labels, labels)


def add_trigger(text: str, trigger: str) -> str:
    """The backdoor trigger put in front of a text: ``trigger + " " + text`` (in front, so that truncation to the
    model's max_length never cuts it off)."""
    return trigger + " " + text


def poison_backdoor(
    texts: list[str], labels: Sequence[int] | torch.Tensor, trigger: str, target: int, poison_fraction: float, seed: int
) -> tuple[list[str], list[int], list[int]]:
    """Backdoor a client's data (Gu et al. 2017; Bagdasaryan et al. 2020): pick floor(poison_fraction * n + 0.5)
    examples whose label is not ``target`` (all of them if fewer; seeded), append the trigger and relabel them
    ``target``. Returns (new texts, new labels, poisoned positions in ascending order); the inputs are untouched."""
    ys = [int(y) for y in (labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else labels)]
    if len(ys) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ys)} labels")
    if not 0 <= poison_fraction <= 1:
        raise ValueError(f"poison_fraction must be in [0, 1], got {poison_fraction}")
    count = math.floor(poison_fraction * len(texts) + 0.5)
    candidates = [i for i, y in enumerate(ys) if y != target]
    if count >= len(candidates):
        chosen = candidates
    else:
        rng = np.random.default_rng(seed)
        chosen = sorted(candidates[int(j)] for j in rng.choice(len(candidates), size=count, replace=False))
    new_texts, new_labels = list(texts), list(ys)
    for i in chosen:
        new_texts[i] = add_trigger(texts[i], trigger)
        new_labels[i] = target
    return new_texts, new_labels, chosen


def backdoor_success(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, target: int
) -> float:
    """Attack success rate: among the examples whose true label is not ``target``, the fraction predicted ``target``
    (evaluate on triggered texts; nan when every example is already of the target class)."""
    pred, true = torch.as_tensor(predictions).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"{pred.numel()} predictions but {true.numel()} labels")
    mask = true != target
    if not bool(mask.any()):
        return float("nan")
    return float((pred[mask] == target).double().mean())
