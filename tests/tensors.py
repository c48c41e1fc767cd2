"""Small tensor helpers shared by the tests of strategies, robust aggregators and attacks."""

from __future__ import annotations

import torch

from fedfm.types import ClientUpdate


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def upd(client: str, n: float, **delta: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(client=client, delta=dict(delta), num_examples=n)


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-7) -> None:
    # (torch.allclose rather than torch.testing.assert_close, whose first call costs ~1 s of imports)
    want = torch.tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32 and actual.shape == want.shape
    assert torch.allclose(actual, want, rtol=1e-6, atol=atol), f"{actual.tolist()} != {want.tolist()}"
