"""The round loop, written once for federated training and every baseline: a fixed pipeline of named stages.

    select     sample the round's clients (seeded by round); features narrow them (stages, deadlines)
    configure  one ClientTask per client: the weights and what each active feature adds
    execute    engine.train(tasks) -> updates, yielded as they arrive
    receive    decode (features) and screen (names, shapes, finite) each update; a rejected one is logged
    aggregate  the aggregator folds the updates in client order (wrapped by the features: secure sum, DP, ...),
               then the server optimizer steps, then the features' server steps (Algorithm 2's 'after')
    evaluate   the global test split when due
    record     the round's metrics record (``Runner.run`` writes it before the atomic checkpoint)

A round that cannot aggregate (too few sampled or reporting clients, a secure sum that cannot be recovered)
raises ``RoundSkipped`` in whichever stage finds it: the model stays, the skip is recorded, the run goes on.
Everything random is derived from (seed, round, participant), so a resumed run repeats the uninterrupted one bit
for bit.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Any

from fedfm.aggregators.base import FoldContext, InOrder
from fedfm.aggregators.mean import Mean
from fedfm.app import App
from fedfm.engines import engine_for
from fedfm.engines.common import Broadcast
from fedfm.errors import RoundSkipped
from fedfm.features.base import RoundContext
from fedfm.registry import build_aggregation
from fedfm.round.groups import Group, needed, plan_groups, sample, shard_sizes
from fedfm.round.record import round_record
from fedfm.round.screen import validate
from fedfm.rundir import RunDir
from fedfm.server_opt.sgd import SGD
from fedfm.store import ClientStates, UpdateSpool
from fedfm.types import ClientTask, ClientUpdate, ServerState

log = logging.getLogger("fedfm")


class Rounds:
    """One method of one config: its groups, its aggregation and the round function ``next``."""

    def __init__(self, app: App, method: str, run_dir: RunDir):
        self.app, self.cfg, self.method, self.dir = app, app.cfg, method, run_dir
        self.groups = plan_groups(app, method)
        self.engine = engine_for(app)
        # the clients' private state (error feedback, control variates, ...), under the run directory; what leaves
        # a client is compressed, attacked or masked only in federated training (the baselines send nothing)
        app.client_states = ClientStates(self.dir.path / "clients")
        app.uplink = method == "federated"
        self.features = [f for f in app.features if method == "federated" or not f.federated_only]
        if method == "federated":
            aggregator, self.optimizer, self.client_options = build_aggregation(self.cfg, len(app.split.client_names))
        else:  # a baseline's one participant per group: plain FedAvg, w + delta
            aggregator, self.optimizer, self.client_options = Mean(), SGD(1.0), {}
        for f in self.features:
            aggregator = f.wrap(aggregator, method)
        self.aggregator = aggregator
        self._spools = itertools.count()

    def initial_state(self) -> ServerState:
        w = self.app.initial_weights
        opt = self.optimizer.init(w)
        for f in self.features:
            opt.update(f.init_state(w))
        return ServerState(0, dict(w), opt)

    def spool(self) -> UpdateSpool:
        """A spool for updates a fold must keep whole, within ``engine.update_memory_mb``."""
        path = self.dir.path / "updates" / f"{next(self._spools):06d}"
        return UpdateSpool(self.cfg.engine.update_memory_mb * 2**20, path)

    # --- one round ------------------------------------------------------------------------------
    def next(self, states, on_update=None) -> dict[str, Any]:
        """One round of every group; ``states`` is updated in place; returns the round's metrics record."""
        r, t0 = states.round + 1, time.perf_counter()
        due = r % self.cfg.eval.every == 0 or r == self.cfg.rounds
        ctx = RoundContext(r, self.method, self.app, self.engine, Broadcast.of(self.app), due)
        groups = self.groups_at(ctx)
        for g, group in enumerate(groups):
            st = states[g]
            try:
                new = self.train(ctx, group, st, on_update)
            except RoundSkipped as why:
                new = self.skip(ctx, group, st, why)
            states[g] = new
            if ctx.due:
                ctx.evals.append(self.app.server_evaluate(new.weights))
        states.round = r
        for f in self.features:
            f.after_round(ctx, states, groups)
        return round_record(ctx, time.perf_counter() - t0)

    def groups_at(self, ctx: RoundContext | int) -> list[Group]:
        """The groups as they train in a round (continual learning: the stage's owners, a matching budget)."""
        if isinstance(ctx, int):
            ctx = RoundContext(ctx, self.method, self.app, self.engine, Broadcast.of(self.app), False)
        groups = self.groups
        for f in self.features:
            groups = f.groups(ctx, groups)
        return groups

    def train(self, ctx: RoundContext, group: Group, st: ServerState, on_update=None) -> ServerState:
        """select -> configure -> execute -> receive -> aggregate, for one group."""
        members = self.select(ctx, group)
        tasks = self.configure(ctx, group, st, members)
        expected = float(sum(shard_sizes(self.app, self.engine, i)[0] for i in members))
        fold = self.aggregator.start(FoldContext(ctx.round, st.weights, st, members, self.engine, self.spool, expected))
        order = InOrder(members) if self.aggregator.ordered else None
        layout = self.layout(st)
        for index, update in self.engine.train(tasks, ctx.downlink):
            self.fold_in(fold, order, index, self.receive(ctx, update, st, layout))
            del update  # folded: gone before the next client trains, so a round holds one update at a time
            if on_update is not None:
                on_update()
        for u in order.flush() if order is not None else ():
            fold.add(u)
        return self.aggregate(ctx, group, st, fold)

    @staticmethod
    def fold_in(fold, order: InOrder | None, index: int, update: ClientUpdate | None) -> None:
        """Fold ``update`` in when its turn in client order has come, with any that waited behind it."""
        for u in order.arrive(index, update) if order is not None else ([update] if update else []):
            fold.add(u)

    def select(self, ctx: RoundContext, group: Group) -> list[int]:
        """The seeded sample of the group's members, narrowed by the features (continual stages, deadlines)."""
        members = sample(group, ctx.round, self.cfg)
        ctx.sampled += members
        for f in self.features:
            members = f.select(ctx, group, members)
        return members

    def configure(self, ctx: RoundContext, group: Group, st: ServerState, members: list[int]) -> list[tuple[int, ClientTask]]:
        """One task per client: the global weights, the group's budget and what every feature adds."""
        extra = {"batch_size": group.batch_size} if group.batch_size else {}
        for f in self.features:
            extra.update(f.configure(ctx, group, st, members))
        task = ClientTask(ctx.round, st.weights, group.num_examples, config=extra, **self.client_options)
        for _ in (i for i in ctx.late if i in group.members):  # a straggler received its task (its download counts)
            ctx.downlink.task(task)
        if len(members) < needed(group, self.cfg):  # too few sampled (or on time): nobody trains
            raise RoundSkipped(f"round {ctx.round}: {len(members)} client(s) to train in group {group.name} "
                               f"(< min_clients {needed(group, self.cfg)})")
        return [(i, task) for i in members]

    def layout(self, st: ServerState):
        """What a valid update holds: the trainable tensors, as each feature changes it (control change, mask)."""
        layout = st.weights
        for f in self.features:
            layout = f.expected(layout)
        return layout

    def receive(self, ctx: RoundContext, update: ClientUpdate | None, st: ServerState, layout) -> ClientUpdate | None:
        """Decode (features) and screen one arrival; None when it vanished or is rejected (logged, recorded)."""
        if update is None:
            return None
        ctx.reports.append(replace(update, delta={}))  # what the record counts of it; the delta goes to the fold
        reason = None
        for f in self.features:
            reason = reason or f.decode(ctx, update, st.weights)
        reason = reason or (validate(update, layout) if layout is not None else None)
        if reason is None:
            return update
        log.warning("round %d: rejected update from %s: %s", ctx.round, update.client, reason)
        ctx.rejected.append({"client": update.client, "reason": reason})
        return None

    def aggregate(self, ctx: RoundContext, group: Group, st: ServerState, fold) -> ServerState:
        """The fold's result through the server optimizer, then each feature's server step."""
        need = needed(group, self.cfg)
        if fold.count < need:
            raise RoundSkipped(f"round {ctx.round}: {fold.count} valid update(s) in group {group.name} "
                               f"(< min_clients {need})")
        agg = fold.result()
        ctx.rejected += agg.rejected
        if agg.count < need:  # the fold itself refused some (norm screening, secure aggregation)
            raise RoundSkipped(f"round {ctx.round}: {agg.count} valid update(s) in group {group.name} "
                               f"(< min_clients {need})")
        ctx.record.update(agg.info)
        ctx.bytes_down += agg.bytes_down
        ctx.mean_loss = agg.mean_loss if agg.mean_loss is not None else ctx.mean_loss
        weights, own = self.optimizer.step(st.weights, st.opt, agg.delta)
        new = ServerState(ctx.round, weights, {**st.opt, **own, **agg.opt})
        for f in self.features:
            new = f.step(ctx, group, new, agg)
        return new

    def skip(self, ctx: RoundContext, group: Group, st: ServerState, why: RoundSkipped) -> ServerState:
        """The group's model stays; the reporters' updates are dropped and so is the state they saved this round
        (their next round reads the state from before, as a resume would: under Flower, owners keep theirs)."""
        if why.counted:
            log.warning("%s; the model is unchanged", why)
            ctx.skipped = True
            names = {self.app.shards[i].name for i in group.members}
            for u in ctx.reports:
                if u.client in names and u.client not in ctx.discarded:
                    ctx.discarded.add(u.client)
                    self.app.client_states.discard(u.client, ctx.round)
        return ServerState(ctx.round, st.weights, st.opt)
