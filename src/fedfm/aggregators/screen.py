"""Norm screening (``federation.max_norm_ratio``): drop the updates whose norm is far above the round's median.

The median is known only once every update is in, so the screen keeps the round's updates in the spool, measures
each norm as it arrives, and at the end folds those within ``ratio`` x the median into the inner aggregator (in
the order they came) and reports the rest as rejected, with the reason. Norms are of the model change only: a
SCAFFOLD control change beside it is in gradient units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedfm.aggregators.base import Aggregate, FoldContext, Wrapper, keep
from fedfm.aggregators.robust import _norm, outliers_of
from fedfm.errors import RoundSkipped
from fedfm.types import ClientUpdate

log = logging.getLogger("fedfm")


class _ScreenFold:
    def __init__(self, inner, ctx: FoldContext, ratio: float):
        self.inner, self.ratio, self.round = inner, ratio, ctx.round
        self.keys = list(ctx.reference)
        self.spool = ctx.spool() if ctx.spool is not None else None
        self.kept: list[ClientUpdate] = []
        self.norms: dict[str, float] = {}

    @property
    def count(self) -> int:
        return len(self.kept)

    def add(self, update: ClientUpdate) -> None:
        self.norms[update.client] = _norm({k: update.delta[k] for k in self.keys})
        self.kept.append(keep(self.spool, update))

    def result(self) -> Aggregate:
        try:
            out = outliers_of(self.norms, self.ratio)
            for u in self.kept:
                if u.client not in out:
                    self.inner.add(u)
            if self.inner.count == 0:
                raise RoundSkipped(f"round {self.round}: norm screening left no update")
            agg = self.inner.result()
        finally:
            if self.spool is not None:
                self.spool.close()
        for client, reason in out.items():
            log.warning("round %d: rejected update from %s: %s", self.round, client, reason)
        agg.rejected += [{"client": c, "reason": r} for c, r in out.items()]
        return agg


@dataclass(frozen=True)
class NormScreen(Wrapper):
    """``inner``, fed only the updates whose norm is at most ``ratio`` x the round's median norm."""

    ratio: float

    @property
    def needs_individual_updates(self) -> bool:
        return True

    def start(self, ctx: FoldContext) -> _ScreenFold:
        return _ScreenFold(self.inner.start(ctx), ctx, self.ratio)
