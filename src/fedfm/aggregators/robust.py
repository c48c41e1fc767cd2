"""Robust aggregation: statistics that need every client's update individually.

Coordinate-wise median and trimmed mean (Yin et al. 2018), Krum / Multi-Krum (Blanchard et al. 2017) and norm
bounding (Sun et al. 2019). Each tolerates a minority of arbitrary (Byzantine) updates; none can run on a securely
aggregated or DP-noised sum, hence ``needs_individual_updates``. Their folds keep the round's updates in an
``UpdateSpool`` (memory budget, then memory-mapped files) and every statistic below reads them one tensor at a
time, so a round holds all clients' copies of one tensor at once, not all their updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedfm.aggregators.base import Aggregate, FoldContext, keep
from fedfm.aggregators.mean import MeanFold
from fedfm.compression import flatten
from fedfm.privacy.dp import clip, global_norm
from fedfm.store import UpdateSpool
from fedfm.types import ClientUpdate, Weights

log = logging.getLogger("fedfm")


# --- shared helpers ------------------------------------------------------------------------------


def _nonempty(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The updates sorted by client name; ValueError on zero updates."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return sorted(updates, key=lambda u: u.client)


def _median(values: list[float]) -> float:
    """Median of a non-empty list; an even count averages the two middle values (as coordinate_median does)."""
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def flat(update_delta: Weights) -> torch.Tensor:
    """One float32 vector in sorted-key order (``fedfm.compression.flatten``): the geometry the robust rules below
    reason in (Krum's distances, norm bounding's global L2 norm)."""
    return flatten(update_delta)


def _norm(delta: Weights) -> float:
    """Global L2 norm of a delta over all its tensors (``fedfm.privacy.dp.global_norm``, float64)."""
    return global_norm(delta) if delta else 0.0


def _stacked(ordered: list[ClientUpdate], name: str) -> torch.Tensor:
    """Every client's copy of one tensor, stacked (clients x shape): the most a robust statistic holds at once."""
    return torch.stack([u.delta[name].float() for u in ordered])


# --- coordinate-wise median and trimmed mean -----------------------------------------------------


def coordinate_median(updates: list[ClientUpdate]) -> Weights:
    """Coordinate-wise median of the deltas (Yin et al. 2018); an even count averages the two middle values."""
    ordered = _nonempty(updates)
    n = len(ordered)
    out: Weights = {}
    for k in ordered[0].delta:
        # sort rather than torch.median (which returns the lower middle value) or torch.quantile (size-limited)
        s = _stacked(ordered, k).sort(dim=0).values
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(updates: list[ClientUpdate], trim_fraction: float) -> Weights:
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-robust distributed learning: towards optimal
    statistical rates"): per coordinate, drop the k = floor(trim_fraction * n) largest and k smallest values and take
    the unweighted mean of the remaining n - 2k."""
    ordered = _nonempty(updates)
    n = len(ordered)
    if trim_fraction < 0:
        raise ValueError(f"trim_fraction must be >= 0, got {trim_fraction}")
    k = math.floor(trim_fraction * n)
    if 2 * k >= n:
        raise ValueError(
            f"trim_fraction {trim_fraction} trims {k} largest and {k} smallest of {n} updates per coordinate, "
            f"leaving none; use trim_fraction < 0.5 and more updates per round (need n > 2k)"
        )
    if k == 0 and trim_fraction > 0:
        log.warning("trimmed mean: trim_fraction %g of %d updates trims none; this round is a plain mean", trim_fraction, n)
    return {name: _stacked(ordered, name).sort(dim=0).values[k : n - k].mean(dim=0) for name in ordered[0].delta}


# --- Krum / Multi-Krum ---------------------------------------------------------------------------


def krum_scores(updates: list[ClientUpdate], f: int) -> list[float]:
    """Krum scores (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient descent"):
    score_i = sum of the squared L2 distances from update i to its n - f - 2 nearest other updates (at least one
    neighbour). Returned in client-name order; lower = more central."""
    ordered = _nonempty(updates)
    if f < 0:
        raise ValueError(f"the number of Byzantine clients f must be >= 0, got {f}")
    n = len(ordered)
    # pairwise squared distances, one tensor at a time (in float64): a whole update per client need not fit at once
    d = [[0.0] * n for _ in range(n)]
    for name in sorted(ordered[0].delta):
        vecs = [u.delta[name].double().reshape(-1) for u in ordered]
        for i in range(n):
            for j in range(i + 1, n):
                d[i][j] += float((vecs[i] - vecs[j]).pow(2).sum())
    for i in range(n):
        for j in range(i + 1, n):
            d[j][i] = d[i][j]
    if n <= 2 * f + 2:
        log.warning("Krum: %d updates with f=%d Byzantine is outside its guarantee (needs n > 2f + 2)", n, f)
    neighbours = min(max(n - f - 2, 1), n - 1)
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[:neighbours]) for i in range(n)]


def multi_krum(updates: list[ClientUpdate], f: int, m: int) -> tuple[Weights, list[str]]:
    """Multi-Krum (Blanchard et al. 2017): the example-weighted mean of the m updates with the lowest Krum scores
    (ties broken by client name). m = 1 is Krum. Returns (mean delta, the selected clients, best score first)."""
    ordered = _nonempty(updates)
    if not 1 <= m <= len(ordered):
        raise ValueError(f"Multi-Krum must select between 1 and {len(ordered)} updates, got m={m}")
    scores = krum_scores(ordered, f)
    best = sorted(range(len(ordered)), key=lambda i: (scores[i], ordered[i].client))[:m]
    chosen = [ordered[i] for i in best]
    fold = MeanFold(expected=sum(float(u.num_examples) for u in chosen))
    for u in sorted(chosen, key=lambda u: u.client):
        fold.add(u)
    return fold.result().delta, [u.client for u in chosen]


# --- norm bounding -------------------------------------------------------------------------------


def clip_to_norm(delta: Weights, bound: float) -> tuple[Weights, float]:
    """delta * min(1, bound / ||delta||) with ||.|| the global L2 norm over all tensors (Sun et al. 2019, "Can you
    really backdoor federated learning?"): DP-FedAvg's clipping (``fedfm.privacy.dp.clip``). Returns (new tensors,
    the norm before clipping)."""
    if bound < 0:
        raise ValueError(f"norm bound must be >= 0, got {bound}")
    clipped, norm = clip({k: t.float() for k, t in delta.items()}, bound)
    return clipped, norm


def norm_bounded_mean(updates: list[ClientUpdate], bound: float | None) -> Weights:
    """Norm bounding (Sun et al. 2019): clip every update's global L2 norm to ``bound``, then the example-weighted
    mean. bound None = adaptive: the median of this round's update norms."""
    ordered = _nonempty(updates)
    if bound is None:
        bound = _median([_norm(u.delta) for u in ordered])
    fold = MeanFold(expected=sum(float(u.num_examples) for u in ordered))
    for u in ordered:  # one clipped update at a time
        fold.add(replace(u, delta=clip_to_norm(dict(u.delta), bound)[0]))
    return fold.result().delta


def norm_outliers(updates: list[ClientUpdate], ratio: float) -> dict[str, str]:
    """Client name -> reason for every update whose global L2 norm exceeds ratio x the median norm of the round
    (the signature of scaling / model-replacement attacks, Bagdasaryan et al. 2020; Sun et al. 2019). Diagnostic only;
    empty with fewer than 3 updates, where a median says little."""
    ordered = _nonempty(updates)
    return outliers_of({u.client: _norm(u.delta) for u in ordered}, ratio)


def outliers_of(norms: dict[str, float], ratio: float) -> dict[str, str]:
    """``norm_outliers`` on norms already measured (the screen measures each update's norm as it arrives)."""
    if ratio <= 0:
        raise ValueError(f"outlier ratio must be > 0, got {ratio}")
    if len(norms) < 3:
        return {}
    med = _median(list(norms.values()))
    out: dict[str, str] = {}
    for client, norm in norms.items():
        if norm > ratio * med:
            times = f"{norm / med:.1f}x" if med > 0 else "infinitely many times"
            out[client] = f"update norm {norm:.3g} is {times} the round's median {med:.3g} (limit {ratio:g}x)"
    return out


# --- the aggregators -----------------------------------------------------------------------------


class KeptFold:
    """Keeps every update of the round (in a spool when the round gives one), then applies ``combine`` to them all."""

    def __init__(self, combine: Callable[[list[ClientUpdate]], tuple[Weights, dict]], spool: UpdateSpool | None):
        self.combine, self.spool = combine, spool
        self.kept: list[ClientUpdate] = []

    @property
    def count(self) -> int:
        return len(self.kept)

    def add(self, update: ClientUpdate) -> None:
        self.kept.append(keep(self.spool, update))

    def result(self) -> Aggregate:
        try:
            delta, info = self.combine(self.kept)
            return Aggregate(delta, float(sum(u.num_examples for u in self.kept)), len(self.kept), info)
        finally:
            if self.spool is not None:
                self.spool.close()


def _keep(ctx: FoldContext | None, combine) -> KeptFold:
    return KeptFold(combine, ctx.spool() if ctx is not None and ctx.spool is not None else None)


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median (unweighted): tolerant of a minority of arbitrary updates."""

    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def start(self, ctx: FoldContext | None = None) -> KeptFold:
        return _keep(ctx, lambda ups: (coordinate_median(ups), {}))


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (unweighted): drops ``trim_fraction`` of each tail."""

    trim_fraction: float = 0.2
    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    def start(self, ctx: FoldContext | None = None) -> KeptFold:
        return _keep(ctx, lambda ups: (trimmed_mean(ups, self.trim_fraction), {}))


@dataclass(frozen=True)
class Krum:
    """Krum / Multi-Krum. f = floor(byzantine_fraction * n) for the n updates of the round; multikrum_m = 1 is Krum,
    None selects n - f (Multi-Krum), an integer m selects min(m, n)."""

    byzantine_fraction: float = 0.2
    multikrum_m: int | None = 1
    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {self.byzantine_fraction}")
        if self.multikrum_m is not None and self.multikrum_m < 1:
            raise ValueError(f"multikrum_m must be >= 1 or None, got {self.multikrum_m}")

    def select(self, updates: list[ClientUpdate]) -> tuple[Weights, dict]:
        n = len(updates)
        f = math.floor(self.byzantine_fraction * n)
        m = n - f if self.multikrum_m is None else min(self.multikrum_m, n)
        return multi_krum(updates, f, m)[0], {}

    def start(self, ctx: FoldContext | None = None) -> KeptFold:
        return _keep(ctx, self.select)


@dataclass(frozen=True)
class NormBound:
    """Norm bounding: every update clipped to ``norm_bound`` (None: the round's median norm), then the weighted mean."""

    norm_bound: float | None = None
    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ValueError(f"norm_bound must be > 0 or None, got {self.norm_bound}")

    def start(self, ctx: FoldContext | None = None) -> KeptFold:
        return _keep(ctx, lambda ups: (norm_bounded_mean(ups, self.norm_bound), {}))
