"""What every aggregator shares: a fold that takes a round's updates one at a time, and the round's result.

An aggregator turns the updates of one round into one update; the server optimizer (``fedfm.server_opt``) then
applies it. ``start`` opens a round and returns a *fold*: ``add`` takes each valid update as it arrives (the
round loop hands them over in client order, holding back only those that arrive early) and ``result`` gives the
round's update. Mean-family folds keep running sums, so a round holds one update at a time; aggregators that need
every update (median, Krum, LoRA products) keep them in an ``UpdateSpool`` (memory budget, then disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

from fedfm.store import UpdateSpool
from fedfm.types import ClientUpdate, ServerState, Weights


@dataclass
class Aggregate:
    """A round's combined update: the step for the server optimizer, and what the round record shows of it."""

    delta: Weights
    weight: float  # the total weight folded in (example counts; the number of reporters under DP)
    count: int  # updates folded in
    info: dict[str, Any] = field(default_factory=dict)  # metrics for the round record
    opt: Weights = field(default_factory=dict)  # new server state of the aggregator's own namespace (DP's clip norm)
    rejected: list[dict] = field(default_factory=list)  # updates the fold refused, with the reason
    mean_loss: float | None = None  # the clients' mean training loss, when the server sees only a sum of them
    bytes_down: int = 0  # protocol traffic to the clients beyond their tasks (secure aggregation's key exchange)


@dataclass
class FoldContext:
    """What a fold may need about its round: most aggregators read only ``reference``."""

    round: int
    reference: Weights  # the global trainable tensors of the round (names, shapes and the point deltas start from)
    state: ServerState | None = None
    members: list[int] = field(default_factory=list)  # federation indices of the clients asked this round
    engine: Any = None  # for protocol exchanges (secure aggregation's key exchange and unmasking)
    spool: Callable[[], UpdateSpool] | None = None  # a fresh spool for this round's kept updates
    expected_weight: float | None = None  # the members' total example count, if every one of them reports


class Fold(Protocol):
    """One round of an aggregator."""

    count: int  # updates accepted so far (the round loop checks federation.min_clients against it)

    def add(self, update: ClientUpdate) -> None: ...

    def result(self) -> Aggregate: ...


class Aggregator(Protocol):
    """Combines a round's client updates into one (Reddi et al. 2021's aggregator, before the server optimizer)."""

    needs_individual_updates: ClassVar[bool]  # cannot run on a securely aggregated or DP-noised sum
    ordered: ClassVar[bool]  # folds in client order as updates arrive (False: keeps them all, order is irrelevant)

    def start(self, ctx: FoldContext) -> Fold: ...


@dataclass(frozen=True)
class Wrapper:
    """An aggregator around ``inner`` (a subclass gives ``start``): it has the inner one's capabilities unless it
    overrides them."""

    inner: Aggregator

    @property
    def needs_individual_updates(self) -> bool:
        return self.inner.needs_individual_updates

    @property
    def ordered(self) -> bool:
        return self.inner.ordered


def keep(spool: UpdateSpool | None, update: ClientUpdate) -> ClientUpdate:
    """``update`` with its tensors moved into ``spool`` (read back lazily), or as it is when there is no spool."""
    if spool is None:
        return update
    spool.put(update.client, dict(update.delta))
    return replace(update, delta=spool.delta(update.client))


class InOrder:
    """Releases arrivals in the order of ``order``, holding back those that arrive early.

    An engine yields updates as clients finish (Ray and Flower in any order); a fold that sums floats must add them
    in one fixed order to give the same bits every run. A client reported gone releases the ones waiting behind it.
    """

    def __init__(self, order: list[int]):
        self.order, self.at, self.waiting = list(order), 0, {}

    def arrive(self, index: int, item) -> Iterator:
        """``item`` for client ``index`` (None: it sent nothing usable); yields what is now next in order."""
        self.waiting[index] = item
        while self.at < len(self.order) and self.order[self.at] in self.waiting:
            ready = self.waiting.pop(self.order[self.at])
            self.at += 1
            if ready is not None:
                yield ready

    def flush(self) -> Iterator:
        """At the end of the round: what is still held (its predecessors never came), in order."""
        for index in self.order[self.at:]:
            item = self.waiting.pop(index, None)
            if item is not None:
                yield item
        self.at = len(self.order)

    @property
    def held(self) -> int:
        return sum(1 for v in self.waiting.values() if v is not None)
