"""LoRA-aware aggregators: the exact product mean (also FlexLoRA's, with heterogeneous ranks), HetLoRA's per-component
mean, and the diagnostic of how far averaging the factors is from averaging their products (``fedfm.lora``).

Each needs the round's factors all together (a product mean is re-factorised by SVD), so their folds keep the
updates in the round's ``UpdateSpool``; LoRA updates are small, and the functions read one module at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from fedfm import lora
from fedfm.aggregators.base import Aggregate, FoldContext, Wrapper
from fedfm.aggregators.robust import KeptFold, _keep
from fedfm.types import ClientUpdate


def _ranks(updates: list[ClientUpdate]) -> dict[str, int]:
    """Each client's LoRA rank, as the receive stage read it from its packed update (``lora_rank``)."""
    return {u.client: int(u.metrics["lora_rank"]) for u in updates}


@dataclass(frozen=True)
class LoraExact:
    """The LoRA products' example-weighted mean, re-factorised to the global rank by truncated SVD (``exact``);
    with heterogeneous client ranks (``heterogeneous``) it is FlexLoRA's server step (``flexlora``)."""

    heterogeneous: bool = False
    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def start(self, ctx: FoldContext) -> KeptFold:
        ref = ctx.reference
        return _keep(ctx, lambda ups: lora.exact_mean(ref, ups, ranks=_ranks(ups) if self.heterogeneous else None))


@dataclass(frozen=True)
class HetLora:
    """HetLoRA: each rank component averaged over the clients that hold it (zero-padding aggregation)."""

    needs_individual_updates: ClassVar[bool] = True
    ordered: ClassVar[bool] = False

    def start(self, ctx: FoldContext) -> KeptFold:
        ref = ctx.reference
        return _keep(ctx, lambda ups: (lora.hetlora_mean(ref, ups, _ranks(ups)), {}))


class _GapFold:
    """Folds into ``inner`` and keeps each update's LoRA factors to measure ``lora.product_gap`` at the end."""

    def __init__(self, inner, ctx: FoldContext, keys: set[str]):
        self.inner, self.ctx, self.keys = inner, ctx, keys
        self.spool = ctx.spool() if ctx.spool is not None else None
        self.kept: list[ClientUpdate] = []

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, update: ClientUpdate) -> None:
        self.inner.add(update)
        factors = {k: update.delta[k] for k in self.keys}
        if self.spool is not None:
            self.spool.put(update.client, factors)
            factors = self.spool.delta(update.client)
        self.kept.append(replace(update, delta=factors))

    def result(self) -> Aggregate:
        try:
            agg = self.inner.result()
            lora_only = {k: v for k, v in self.ctx.reference.items() if k in self.keys}
            agg.info["lora_product_gap"] = lora.product_gap(lora_only, self.kept)
            return agg
        finally:
            if self.spool is not None:
                self.spool.close()


@dataclass(frozen=True)
class WithProductGap(Wrapper):
    """``inner`` (the mean of separate factors), reporting each round how far mean(B) mean(A) is from mean(B A)."""

    keys: frozenset[str]  # the LoRA factors' tensor names

    def start(self, ctx: FoldContext) -> _GapFold:
        return _GapFold(self.inner.start(ctx), ctx, set(self.keys))
