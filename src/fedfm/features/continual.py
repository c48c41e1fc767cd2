"""``continual``: federated continual learning as a feature of the one round loop (``fedfm.continual`` holds the
schedule, the owners' stage data, the penalty and the merge; this module plugs them into the stages).

Each round trains the stage's data of the owners taking part (``groups``); an owner with nothing to train sits
the round out; ewc/l2sp clients add the stage's quadratic penalty (``configure``); at a stage end the server
evaluates every stage's test set, sets the next anchor (and federated Fisher, asked of the owners through the
engine) or merges the stage's adapter (``after_round``). Its server state is ``cl.`` in ``ServerState.opt``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedfm.continual import PREFIX, ContinualRun
from fedfm.errors import RoundSkipped
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.protocol import FISHER
from fedfm.round.groups import Group, pooled_group
from fedfm.types import ServerState


class Continual(Feature):
    name = "continual.stages"
    prefixes = (PREFIX,)

    def __init__(self, app):
        self.app, self.cur = app, app.continual
        self._runs: dict[str, ContinualRun] = {}

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.continual.active

    def run(self, method: str) -> ContinualRun:
        if method not in self._runs:
            self._runs[method] = ContinualRun(self.app, method)
        return self._runs[method]

    def groups(self, ctx: RoundContext, groups: list[Group]) -> list[Group]:
        """Only the owners taking part in the round's stage, with data for it; a centralized budget to match."""
        run = self.run(ctx.method)
        if ctx.method == "centralized":
            owners = run.eligible(list(range(len(self.app.split.client_names))), ctx.round)
            sizes = [len(self.cur.train_rows(i, run.stage(ctx.round))) for i in owners]
            return [pooled_group(groups[0].members[0], sizes, self.app.cfg)]
        return [replace(g, members=run.eligible(g.members, ctx.round)) for g in groups]

    def select(self, ctx: RoundContext, group: Group, members: list[int]) -> list[int]:
        if not members:  # this group's owners sit the stage out: its model stays, and that is no skipped round
            raise RoundSkipped(f"round {ctx.round}: group {group.name} sits the stage out", counted=False)
        return members

    def configure(self, ctx: RoundContext, group: Group, state: ServerState, members: list[int]) -> dict[str, Any]:
        return self.run(ctx.method).client_config(state.opt)  # the penalty of ewc / l2sp

    def after_round(self, ctx: RoundContext, states, groups: list[Group]) -> None:
        record = self.run(ctx.method).after_round(ctx.round, states, groups, ctx.engine)
        ctx.bytes_down += record.get("cl_bytes_down", 0)
        ctx.bytes_up += record.get("cl_bytes_up", 0)
        ctx.record.update(record)

    def summary(self, runner, rounds: int, metrics: list[dict]) -> dict[str, Any]:
        return {"continual": self.run(runner.method).summary(metrics)}

    def client_before(self, c: ClientRound) -> None:
        c.data = self.cur.train_data(c.index, c.task.round)

    def protocol(self) -> dict:
        return {FISHER: self.cur.fisher_reply}
