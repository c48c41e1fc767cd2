"""Logit adjustment for label skew: the offset by hand, and no change when a client matches the federation."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.tasks.classification import ClassificationTask


def test_offset_by_hand():
    task = ClassificationTask(3)
    # client labels [0, 0, 1] -> add-one counts [3, 2, 1] / 6; federation counts [10, 5, 5] -> [11, 6, 6] / 23
    off = task.logit_offset(torch.tensor([0, 0, 1]), torch.tensor([10, 5, 5]))
    expected = [math.log(3 / 6) - math.log(11 / 23), math.log(2 / 6) - math.log(6 / 23), math.log(1 / 6) - math.log(6 / 23)]
    assert off.tolist() == pytest.approx(expected, abs=1e-6)


def test_matching_distribution_gives_zero_offset_and_plain_loss():
    task = ClassificationTask(2)
    off = task.logit_offset(torch.tensor([0, 1, 1]), torch.tensor([1, 2]))  # labels vs their own counts
    assert off.abs().max() < 1e-7

    class Toy(torch.nn.Module):  # a two-class "model" with the HF output interface
        def forward(self, input_ids, attention_mask, labels=None):
            logits = input_ids.float()
            out = type("Out", (), {})()
            out.logits = logits
            out.loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return out

    batch = {"input_ids": torch.tensor([[1, 3], [2, 0]]), "attention_mask": torch.ones(2, 2), "labels": torch.tensor([1, 0])}
    plain = task.loss(Toy(), batch)
    adjusted = task.loss(Toy(), batch, off)
    assert float(adjusted) == pytest.approx(float(plain), abs=1e-6)
    # a client that sees only class 1 gets class 0's logit lowered, so predicting 1 costs it less
    skew = task.logit_offset(torch.tensor([1, 1, 1, 1]), torch.tensor([5, 5]))
    assert skew[0] < 0 < skew[1]
    assert float(task.loss(Toy(), {**batch, "labels": torch.tensor([1, 1])}, skew)) < float(task.loss(Toy(), {**batch, "labels": torch.tensor([1, 1])}))
