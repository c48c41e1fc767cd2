"""Tests of fedfm.attacks: the Byzantine client set, update poisoning, label flipping and backdoors.

Every expected number is worked out by hand in a comment next to it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensors import T

from fedfm.attacks import (
    ATTACKS,
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    add_trigger,
    backdoor_success,
    byzantine_clients,
    default_scale,
    flip_labels,
    poison_backdoor,
    poison_update,
)


def test_attack_names_partition():
    assert set(UPDATE_ATTACKS) | set(DATA_ATTACKS) | {"none"} == set(ATTACKS)
    assert not set(UPDATE_ATTACKS) & set(DATA_ATTACKS)


# --- byzantine_clients -------------------------------------------------------------------------------


def test_byzantine_clients_size_and_determinism():
    chosen = byzantine_clients(10, 0.2, seed=0)
    assert len(chosen) == 2 and chosen <= set(range(10))  # floor(0.2 * 10 + 0.5) = 2
    assert byzantine_clients(10, 0.2, seed=0) == chosen
    assert len(byzantine_clients(10, 0.25, seed=0)) == 3  # floor(2.5 + 0.5) = 3
    assert len(byzantine_clients(10, 0.04, seed=0)) == 0  # floor(0.4 + 0.5) = 0
    assert byzantine_clients(10, 1.0, seed=0) == frozenset(range(10))
    assert isinstance(chosen, frozenset) and all(type(i) is int for i in chosen)


def test_byzantine_clients_differ_between_seeds():
    sets = {byzantine_clients(20, 0.2, seed=s) for s in range(6)}
    assert len(sets) > 1


def test_byzantine_clients_rejects_bad_fraction():
    with pytest.raises(ValueError):
        byzantine_clients(10, 1.5, seed=0)


# --- update attacks ----------------------------------------------------------------------------------


def test_default_scale():
    assert default_scale("sign_flip") == 4.0 and default_scale("scaling") == 30.0
    assert default_scale("noise") == 1.0
    # 20% attackers at -4x: FedAvg moves 0.8 * 1 + 0.2 * (-4) = 0 times the honest direction
    assert 0.8 + 0.2 * -default_scale("sign_flip") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown attack"):
        default_scale("gaslight")


def test_poison_update_sign_flip_and_scaling():
    delta = {"x": T(1, -2), "y": T(0.5)}
    gen = torch.Generator().manual_seed(0)
    out = poison_update(delta, "sign_flip", 4.0, 0.0, gen)
    # -4 * (1, -2) = (-4, 8); -4 * 0.5 = -2
    assert torch.equal(out["x"], T(-4, 8)) and torch.equal(out["y"], T(-2))
    out = poison_update(delta, "scaling", 30.0, 0.0, gen)
    # 30 * (1, -2) = (30, -60); 30 * 0.5 = 15
    assert torch.equal(out["x"], T(30, -60)) and torch.equal(out["y"], T(15))
    assert torch.equal(delta["x"], T(1, -2)) and torch.equal(delta["y"], T(0.5))  # input untouched


def test_poison_update_noise_replaces_and_is_reproducible():
    delta = {"b": torch.zeros(100, 50), "a": torch.ones(3)}
    a = poison_update(delta, "noise", 1.0, 0.1, torch.Generator().manual_seed(7))
    b = poison_update(delta, "noise", 1.0, 0.1, torch.Generator().manual_seed(7))
    c = poison_update(delta, "noise", 1.0, 0.1, torch.Generator().manual_seed(8))
    assert list(a) == ["b", "a"] and a["b"].shape == (100, 50) and a["a"].shape == (3,)
    assert all(torch.equal(a[k], b[k]) for k in delta)
    assert not torch.equal(a["b"], c["b"])
    # 5000 draws of N(0, 0.1^2): sample std within 5% of 0.1, mean within 5 standard errors (5 * 0.1/sqrt(5000))
    assert abs(float(a["b"].std()) - 0.1) < 0.005 and abs(float(a["b"].mean())) < 0.0071
    assert torch.equal(delta["a"], torch.ones(3)) and not delta["b"].any()  # input untouched


def test_poison_update_rejects_data_attacks():
    for kind in ("label_flip", "backdoor", "none", "bogus"):
        with pytest.raises(ValueError, match="not an update attack"):
            poison_update({"x": T(1)}, kind, 1.0, 0.0, torch.Generator())


# --- data attacks ------------------------------------------------------------------------------------


def test_flip_labels():
    labels = torch.tensor([0, 1, 2])
    # 3 - 1 - y: 0 -> 2, 1 -> 1, 2 -> 0
    assert flip_labels(labels, 3).tolist() == [2, 1, 0]
    assert labels.tolist() == [0, 1, 2]
    # binary: 0 <-> 1; the ignore index -100 stays
    assert flip_labels(torch.tensor([0, 1, -100]), 2).tolist() == [1, 0, -100]


def test_add_trigger():
    assert add_trigger("great movie", "cf") == "cf great movie"


TEXTS = [f"text {i}" for i in range(10)]
LABELS = [0, 1, 0, 1, 1, 0, 1, 0, 1, 1]  # target 1 -> candidates at positions 0, 2, 5, 7


def test_poison_backdoor_counts_and_rows():
    texts, labels = list(TEXTS), list(LABELS)
    new_texts, new_labels, pos = poison_backdoor(texts, labels, "cf", target=1, poison_fraction=0.3, seed=0)
    # floor(0.3 * 10 + 0.5) = 3 of the 4 non-target rows
    assert len(pos) == 3 and set(pos) <= {0, 2, 5, 7} and pos == sorted(pos)
    for i in range(10):
        if i in pos:
            assert new_texts[i] == f"cf text {i}" and new_labels[i] == 1
        else:
            assert new_texts[i] == TEXTS[i] and new_labels[i] == LABELS[i]
    assert texts == TEXTS and labels == LABELS  # inputs untouched
    assert poison_backdoor(texts, labels, "cf", 1, 0.3, seed=0) == (new_texts, new_labels, pos)


def test_poison_backdoor_takes_all_candidates_when_too_few():
    # floor(0.9 * 10 + 0.5) = 9 > 4 candidates: all of 0, 2, 5, 7
    _, new_labels, pos = poison_backdoor(TEXTS, torch.tensor(LABELS), "cf", 1, 0.9, seed=3)
    assert pos == [0, 2, 5, 7] and new_labels == [1] * 10
    # fraction 0: nothing
    assert poison_backdoor(TEXTS, LABELS, "cf", 1, 0.0, seed=3) == (TEXTS, LABELS, [])


def test_backdoor_success():
    preds, labels = [1, 1, 0, 1, 0], [0, 0, 0, 1, 1]
    # rows with true label != 1: 0, 1, 2, predicted 1, 1, 0 -> 2 of 3 hit the target
    assert backdoor_success(preds, labels, 1) == pytest.approx(2 / 3)
    # target 0: rows 3, 4 (label 1), predicted 1, 0 -> 1 of 2
    assert backdoor_success(torch.tensor(preds), torch.tensor(labels), 0) == pytest.approx(0.5)
    assert math.isnan(backdoor_success([1, 0], [1, 1], 1))
