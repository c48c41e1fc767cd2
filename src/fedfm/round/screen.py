"""The receive stage's screen: an update is checked before it can touch the global model.

Names, shapes, dtypes and finiteness of every tensor, and a positive finite example count; a rejected update is
logged with its reason and recorded, never aggregated.
"""

from __future__ import annotations

import math

import torch

from fedfm.types import ClientUpdate, Weights


def validate(update: ClientUpdate, reference: Weights) -> str | None:
    """Why an update must be rejected, or None. A rejected update never touches the global model."""
    if update.delta.keys() != reference.keys():
        return "tensor names differ from the global model's"
    for k, t in update.delta.items():
        if t.shape != reference[k].shape:
            return f"tensor {k} has shape {tuple(t.shape)}, expected {tuple(reference[k].shape)}"
        if not t.is_floating_point():
            return f"tensor {k} has dtype {t.dtype}"
        # any NaN/Inf makes the sum non-finite; the full elementwise check runs only then (a sum can also
        # overflow on finite values, which must not be rejected), keeping the common case cheap
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            return f"tensor {k} contains NaN or Inf"
    if not math.isfinite(update.num_examples) or update.num_examples <= 0:  # a NaN count would pass "<= 0"
        return "num_examples must be a positive finite number"
    return None
