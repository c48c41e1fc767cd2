"""The stages a feature can plug into, and what each stage sees.

A feature is one module holding one class. Every hook below does nothing; a feature overrides the ones it uses
(the pattern of transformers' ``TrainerCallback``), so the round loop and the client pipeline call every active
feature at every stage without asking what it is. A feature

- keeps its server state in its own namespace of ``ServerState.opt`` (``prefixes``, checkpointed with the run),
- keeps a client's private state in that client's own state (``ClientRound.state``: on the owner's machine),
- writes its metrics into the round record (``RoundContext.record``) and the summary,
- is switched on by its config section (``active``), per method where it only concerns federated training.

Server stages, in the order a round calls them (``fedfm.round.loop``):
``groups`` -> ``select`` -> ``configure`` -> [engine] -> ``decode`` -> screen -> fold (``wrap``ped aggregator)
-> server optimizer -> ``step`` -> evaluate (``evaluated``) -> ``after_round``. Client stages, inside
``App.client_train``: ``client_before`` -> the training loop -> ``client_after``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedfm.heads import Head, head_of
from fedfm.types import ClientTask, ClientUpdate, ServerState, Weights

if TYPE_CHECKING:
    from fedfm.aggregators.base import Aggregate, Aggregator
    from fedfm.app import App
    from fedfm.engines.common import Broadcast
    from fedfm.round.groups import Group


@dataclass
class RoundContext:
    """One round of one method: what the stages and the features share while it runs."""

    round: int
    method: str
    app: App
    engine: Any
    downlink: Broadcast
    due: bool  # the global model is evaluated this round
    record: dict[str, Any] = field(default_factory=dict)  # what features add to the round's metrics record
    reports: list[ClientUpdate] = field(default_factory=list)  # every update received (metadata; deltas let go)
    rejected: list[dict] = field(default_factory=list)  # {"client", "reason"} of every update refused
    discarded: set[str] = field(default_factory=set)  # clients whose reports a skipped round did not use
    sampled: list[int] = field(default_factory=list)  # federation indices asked this round, all groups
    late: list[int] = field(default_factory=list)  # sampled, sent their task, but excluded (stragglers)
    evals: list[dict[str, float]] = field(default_factory=list)  # the groups' global evaluations, when due
    scratch: dict[str, Any] = field(default_factory=dict)  # a feature's notes for later stages of this round
    bytes_down: int = 0  # beyond the engine's downlink (continual learning's anchors, Fisher requests)
    bytes_up: int = 0
    mean_loss: float | None = None  # the clients' mean loss when only their sum is seen (secure aggregation)
    skipped: bool = False

    @property
    def federated(self) -> bool:
        return self.method == "federated"


@dataclass
class ClientRound:
    """One client's round inside ``App.client_train``: what the features prepare for the training loop, and the
    client's private state across rounds."""

    index: int
    name: str
    task: ClientTask
    sends: bool  # a real client whose update leaves for a server (not a baseline, not the server's own data)
    data: Any  # what it trains on (continual learning narrows it to the stage)
    load_state: Callable[[], Weights]
    new_state: Weights = field(default_factory=dict)  # what it keeps for its next round (merged over the old)
    loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None  # (model, batch) -> loss, for the task's own
    control: tuple[Weights, Weights] | None = None  # SCAFFOLD's (c, c_i)
    optimizer_state: Weights | None = None  # train.keep_optimizer_state: AdamW's moments ({} = none yet)
    noise_seed: int | None = None  # DP-SGD's noise, from the client's secret
    finite: bool = True  # the trained update was finite (nothing is kept from a non-finite round)
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # undone after training, even on error
    _state: Weights | None = None
    _secret: list[int] | None = None

    @property
    def state(self) -> Weights:
        """What this client kept from earlier rounds (read on first use: stateless rounds never touch disk)."""
        if self._state is None:
            self._state = self.load_state()
        return self._state

    def noise_secret(self) -> list[int]:
        """The client's own 128-bit noise secret (drawn from the OS once, then kept in its private state)."""
        if self._secret is None:
            from fedfm.privacy import dp

            self._secret, kept = dp.noise_secret(self.state)
            self.new_state.update(kept)
        return self._secret


class Feature:
    """A capability plugged into named stages (every hook is a no-op here)."""

    name: ClassVar[str] = "feature"
    prefixes: ClassVar[tuple[str, ...]] = ()  # its namespace of ServerState.opt
    federated_only: ClassVar[bool] = False  # plays no part in the baselines (centralized, local, server)

    @classmethod
    def active(cls, cfg) -> bool:
        """Whether the config switches this feature on."""
        return False

    # --- server side ---------------------------------------------------------------------------
    def init_state(self, weights: Weights) -> Weights:
        """This feature's initial server state (keys under its ``prefixes``)."""
        return {}

    def groups(self, ctx: RoundContext, groups: list[Group]) -> list[Group]:
        """The groups as they train this round."""
        return groups

    def select(self, ctx: RoundContext, group: Group, members: list[int]) -> list[int]:
        """Narrow the sampled clients; one that received its task but will not report goes to ``ctx.late``."""
        return members

    def configure(self, ctx: RoundContext, group: Group, state: ServerState, members: list[int]) -> dict[str, Any]:
        """What every client task of the group carries beside the weights (``ClientTask.config``)."""
        return {}

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        """Wrap or replace the aggregator (secure aggregation, DP, LoRA products, norm screening)."""
        return aggregator

    def expected(self, layout: Weights | None) -> Weights | None:
        """What a valid update holds, given what it held before this feature (names, shapes, dtypes: the screen's
        reference): SCAFFOLD adds the control change; None when the fold screens updates itself (secure
        aggregation's masked messages, which the protocol checks)."""
        return layout

    def decode(self, ctx: RoundContext, update: ClientUpdate, reference: Weights) -> str | None:
        """Decode what the client sent into a dense update, in place; or why it must be rejected."""
        return None

    def step(self, ctx: RoundContext, group: Group, state: ServerState, agg: Aggregate) -> ServerState:
        """After the server optimizer: the group's state as this feature leaves it (Algorithm 2's 'after')."""
        return state

    def evaluated(self, weights: Weights, metrics: dict[str, float]) -> None:
        """Add to a global evaluation of ``weights`` (the backdoor's success)."""

    def after_round(self, ctx: RoundContext, states, groups: list[Group]) -> None:
        """After every group aggregated: bookkeeping across groups; write the round's record entries."""

    def stop_reason(self, done: int) -> str | None:
        """Why the run must stop before round ``done + 1`` (a privacy budget), or None."""
        return None

    def summary(self, runner, rounds: int, metrics: list[dict]) -> dict[str, Any]:
        """Entries of summary.json."""
        return {}

    def finished(self, runner, states) -> dict[str, Any]:
        """After the final evaluation, while the clients' private state still exists: what owners do with the final
        model (personalization); entries of summary.json."""
        return {}

    # --- client side ---------------------------------------------------------------------------
    def client_before(self, c: ClientRound) -> None:
        """Prepare the client's training (its data, what the loop adds, state to read)."""

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        """Shape what leaves the client (control change, attack, rank, compression, DP, mask)."""
        return update

    def protocol(self) -> dict[str, Callable[[int, bytes], bytes]]:
        """Protocol steps this feature answers at a client (``fedfm.protocol``), by name."""
        return {}


class HeadLoss(Feature):
    """A ``head.loss`` method (FedRS, FedAwS, FedETF): switched on by its name, it finds the model's classification
    head once and sets the clients' loss. The baselines train on the task's cross-entropy."""

    loss_name: ClassVar[str] = ""
    federated_only = True

    def __init__(self, app):
        self.app = app
        self.head: Head = head_of(app.model)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.head.loss == cls.loss_name
