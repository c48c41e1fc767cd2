"""The round loop — written once, used by federated training and by both baselines.

A run trains one or more *groups*. A group is a set of participants that share one model:

- ``federated``: one group holding every client (the strategy aggregates their updates);
- ``centralized``: one group holding a single participant with all clients' training data pooled,
  seeing the same number of examples per round as the federation;
- ``local``: one group per client (each owner alone, its own model);
- ``server``: one group holding the server's own data only (Algorithm 2's data, without the federation).

Algorithm 2 (``server_data``): in federated runs the server also trains on its own data every round,
before aggregation (its update joins the client aggregate as a weighted pseudo-client) or after it
(its update is added to the aggregated model). Server data never enters an engine or leaves the server.

Each round, for every group: configure tasks -> engine runs clients -> validate updates ->
strategy.aggregate -> evaluate -> checkpoint. Everything random is derived from (seed, round,
participant), so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedfm import __version__, report
from fedfm.app import App
from fedfm.client import derive_seed, examples_per_round
from fedfm.config import RunConfig
from fedfm.continual import PREFIX as CONTINUAL_PREFIX
from fedfm.continual import ContinualRun
from fedfm.engines import close_engine, engine_for
from fedfm.errors import FedFMError, TrainingError
from fedfm.models import save_pretrained, set_weights
from fedfm.privacy import dp
from fedfm.privacy.aggregate import PrivateAggregator
from fedfm.rundir import RunDir, atomic_write_text
from fedfm.store import ClientStates, GroupStates, StateStore
from fedfm.strategies import FedAvg, build_strategy
from fedfm.strategies.fedavg import apply
from fedfm.tasks.retrieval import RETRIEVAL_METRICS
from fedfm.types import ClientTask, ClientUpdate, ServerState, Weights

log = logging.getLogger("fedfm")
METHODS = ("federated", "centralized", "local", "server")
# ServerState.opt keys the round loop keeps away from the strategy (which stays a pure function of its own state):
# DP's adaptive clip norm, continual learning's anchor and Fisher
SERVER_KEYS = ("dp.", CONTINUAL_PREFIX)


@dataclass
class Group:
    name: str
    members: list[int]  # participant (shard) indices
    num_examples: int | None = None  # per-participant examples per round (None: from train config)
    batch_size: int | None = None  # per-participant batch size (None: train.batch_size)


def plan_groups(app: App, method: str) -> list[Group]:
    n = len(app.split.client_names)
    if method == "federated":
        return [Group("global", list(range(n)))]
    if method == "local":
        return [Group(app.shards[i].name, [i]) for i in range(n)]
    if method == "centralized":
        pooled = next((i for i, s in enumerate(app.shards) if s.name == "pooled"), None)
        pooled = app.add_pooled_shard() if pooled is None else pooled
        return [pooled_group(pooled, [len(app.shards[i].train) for i in range(n)], app.cfg)]
    if method == "server":
        if app.server_index is None:
            raise FedFMError("method 'server' needs server data: set server_data.fraction > 0")
        steps = app.cfg.server_data.steps or math.ceil(len(app.shards[app.server_index].train) / app.cfg.train.batch_size)
        return [Group("server", [app.server_index], steps * app.cfg.train.batch_size)]
    raise FedFMError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def pooled_group(pooled: int, sizes: list[int], cfg: RunConfig) -> Group:
    """The centralized participant, seeing per round the same budget of examples as a federation of owners with
    ``sizes`` training examples: the expected sampled share of all their work."""
    n = len(sizes)
    examples = max(1, round(num_sampled(n, cfg) / n * sum(examples_per_round(k, cfg.train) for k in sizes)))
    if cfg.compare.centralized == "synchronous":  # data-parallel: one big step per client step
        return Group("pooled", [pooled], examples, cfg.train.batch_size * num_sampled(n, cfg))
    return Group("pooled", [pooled], examples)


def num_sampled(n: int, cfg: RunConfig) -> int:
    # round half up (Python's round() is half-to-even: 0.25 * 10 -> 2 but 0.35 * 10 -> 4)
    return min(n, max(cfg.federation.min_clients, math.floor(cfg.federation.fraction * n + 0.5)))


def sample(group: Group, round_: int, cfg: RunConfig) -> list[int]:
    """Seeded client sampling, a pure function of (seed, round): resumable without saved RNG state.

    'fixed' takes exactly ``num_sampled`` clients; 'poisson' includes each client independently with
    probability ``federation.fraction`` (the count varies from round to round and may be below min_clients).
    """
    if len(group.members) == 1:
        return list(group.members)
    rng = np.random.default_rng(derive_seed(cfg.seed, round_, 0x5A3))
    if cfg.federation.sampling == "poisson":
        keep = rng.random(len(group.members)) < cfg.federation.fraction
        return [m for m, k in zip(group.members, keep) if k]
    k = num_sampled(len(group.members), cfg)
    return sorted(rng.choice(group.members, size=k, replace=False).tolist())


def expected_sampled(n: int, cfg: RunConfig) -> float:
    """Expected clients per round: fraction x n under Poisson sampling, the fixed count otherwise."""
    return cfg.federation.fraction * n if cfg.federation.sampling == "poisson" else float(num_sampled(n, cfg))


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


def with_server(updates: list[ClientUpdate], server: ClientUpdate, share: float) -> list[ClientUpdate]:
    """The updates to aggregate when the server's own update must make up ``share`` of the weighted mean.

    With client weights n_i summing to N, a pseudo-client weight w_s = share / (1 - share) * N gives
    w_s / (w_s + N) = share; share 0 drops the server update and share 1 keeps only it.
    """
    if share <= 0:
        return list(updates)
    if share >= 1:
        return [server]
    total = float(sum(u.num_examples for u in updates))
    return [*updates, replace(server, num_examples=share / (1.0 - share) * total)]


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else {}


class Runner:
    """Drives one method of one config through its rounds, writing the run directory as it goes."""

    def __init__(self, app: App, method: str, run_dir: RunDir, console: Console | None = None):
        self.app, self.cfg, self.method, self.dir = app, app.cfg, method, run_dir
        self.console = console or Console(stderr=True)
        self.groups = plan_groups(app, method)
        # baselines aggregate their single participant with plain FedAvg (w + delta)
        n = len(app.split.client_names)
        self.strategy = build_strategy(self.cfg.strategy, n) if method == "federated" else FedAvg()
        self.engine = engine_for(app)
        # the clients' private state (error feedback, SCAFFOLD), under the run directory; compression and update
        # attacks act on what is sent, so only in federated training (the baselines send nothing)
        app.client_states = ClientStates(self.dir.path / "clients")
        app.uplink = method == "federated"
        # Algorithm 2 runs inside federated training only (the 'server' method is its data alone)
        self.server_steps = self.cfg.server_data.steps if method == "federated" and app.server_index is not None else 0
        self.stopped: str | None = None  # why the run ended before cfg.rounds (a privacy budget), if it did
        self.cl = ContinualRun(app, method) if app.continual is not None else None  # continual learning's stages
        self.private = None  # DP-FedAvg and/or secure aggregation: federated training only (validated in config)
        if method == "federated" and (self.cfg.dp.active or self.cfg.secagg.enabled):
            n = len(app.split.client_names)
            self.private = PrivateAggregator(self.cfg, n, expected_sampled(n, self.cfg), app.initial_weights)
            self.private.receive = self.receive

    def new_states(self, round_: int = 0) -> GroupStates:
        budget = self.cfg.engine.state_memory_mb * 2**20
        return GroupStates(StateStore(budget, self.dir.path / "client_states"), len(self.groups), round_)

    def initial_states(self) -> GroupStates:
        states = self.new_states()
        w = self.app.initial_weights
        for g in range(len(self.groups)):
            states[g] = ServerState(0, dict(w), {**self.strategy.init(w), **(self.private.init_opt() if self.private else {})})
        return states

    def restore(self, checkpoint) -> GroupStates:
        states = self.new_states(checkpoint.round)
        for g, st in enumerate(checkpoint):
            states[g] = st
        return states

    # --- one round ----------------------------------------------------------------------------
    def round(self, states: GroupStates, progress: Progress | None) -> dict[str, Any]:
        """Train, screen, aggregate and evaluate every group, one group at a time; ``states`` is updated in place."""
        r = states.round + 1
        t0 = time.perf_counter()
        options = self.strategy.client_options()
        groups = self.stage_groups(r)
        picks = [sample(group, r, self.cfg) for group in groups]
        bar = progress.add_task(f"round {r} clients", total=sum(map(len, picks))) if progress else None
        on_done = (lambda u: progress.advance(bar)) if progress else None
        due = r % self.cfg.eval.every == 0 or r == self.cfg.rounds
        seen, rejected, evals, bytes_down = [], [], [], 0
        stragglers: list[dict] = []
        server_log: dict[str, Any] = {}
        skipped, discarded = False, set()  # discarded: clients whose reports a skipped round did not use
        timing: dict[str, float] = {}  # simulated seconds of the clients that reported in time
        lora_log: dict[str, float] = {}

        def unchanged(g: int, st: ServerState) -> None:
            """The group's model stays as it was this round (evaluated again when due: the curve has no hole)."""
            states[g] = ServerState(r, st.weights, st.opt)
            evals.extend([self.app.server_evaluate(st.weights)] if due else [])

        for g, (group, members) in enumerate(zip(groups, picks)):
            st = states[g]
            if not members and self.cl is not None:  # continual learning: this group's owner sits the stage out
                unchanged(g, st)
                continue
            extra = {"batch_size": group.batch_size} if group.batch_size else {}
            extra.update(self.cl.client_config(st.opt) if self.cl else {})  # the penalty of ewc / l2sp
            own = {k: v for k, v in st.opt.items() if not k.startswith(SERVER_KEYS)}
            if hasattr(self.strategy, "task_config"):  # SCAFFOLD's control variate
                extra.update(self.strategy.task_config(ServerState(st.round, st.weights, own)))
            members, late = self.deadline(r, group, members, timing)
            stragglers += late
            bytes_down += len(late) * self.broadcast_bytes(st.weights, extra) if late else 0
            jobs = [(i, ClientTask(r, st.weights, group.num_examples, config=extra, **options)) for i in members]
            private_log: dict[str, Any] = {}
            if self.private is not None:
                if len(members) < self.cfg.federation.min_clients:  # Poisson sampling drew too few: skip the round
                    log.warning("round %d: %d clients sampled (< min_clients); the model is unchanged", r, len(members))
                    unchanged(g, st)
                    private_log = {"epsilon": self.private.epsilon(r)} if self.cfg.dp.active else {}
                    skipped = True
                    continue
                agg, private_log, updates, down = self.private.run(r, st, jobs, self.engine, rejected)
                bytes_down += down
                seen += updates
                valid = [agg]
            else:
                needed = min(self.cfg.federation.min_clients, len(group.members))
                # too few sampled (or past the deadline): nobody trains; too few reported (dropout, vanished nodes):
                # their updates are dropped and so is the state they saved this round (the next round reads the
                # state from before, as on a resume). Raising instead would fail again at this seeded round on
                # every resume.
                updates, down = self.engine.train(jobs, on_done=on_done) if len(jobs) >= needed else ([], 0)
                bytes_down += down
                seen += updates
                if len(updates) < needed:
                    log.warning("round %d: %d of %d updates arrived in group %s (< min_clients %d); the model is "
                                "unchanged", r, len(updates), len(jobs), group.name, needed)
                    for u in updates:
                        discarded.add(u.client)
                        if self.app.client_states is not None:  # (under Flower, owners keep theirs at home)
                            self.app.client_states.discard(u.client, r)
                    unchanged(g, st)
                    skipped = True
                    continue
                valid = self.screen(r, group, st.weights, updates, rejected)
            # strategy state and the privacy state (adaptive clip norm) are kept apart: strategies are pure
            st_strategy = ServerState(st.round, st.weights, own)
            if self.private is None and self.lora_aggregation(st.weights, valid, lora_log):
                valid = [lora_log.pop("_combined")]
            if self.server_steps:
                new, server_log = self.aggregate_with_server(r, st_strategy, valid)
            else:
                new = self.strategy.aggregate(st_strategy, valid)
            kept = {k: v for k, v in st.opt.items() if k.startswith(SERVER_KEYS)}
            new = ServerState(new.round, new.weights, {**new.opt, **kept, **private_log.pop("_opt", {})})
            states[g] = new
            if due:
                evals.append(self.app.server_evaluate(new.weights))
        states.round = r
        cl_log = self.cl.after_round(r, states, groups, self.engine) if self.cl else {}
        bytes_down += cl_log.get("cl_bytes_down", 0)
        if progress:
            progress.remove_task(bar)
        m = _mean(evals) if evals else {}
        refused = {x["client"] for x in rejected} | discarded  # a rejected update's loss and count are not trusted
        trusted = [u for u in seen if u.client not in refused]
        losses = [u.metrics["train_loss"] for u in trusted if "train_loss" in u.metrics]
        if not losses and "secure_train_loss" in private_log:
            losses = [private_log["secure_train_loss"]]
        return {
            "method": self.method,
            "round": r,
            "sampled": sum(map(len, picks)),
            "clients": [u.client for u in seen],
            "train_loss": float(np.mean(losses)) if losses else None,
            "eval_loss": m.get("loss"),
            "accuracy": m.get("accuracy"),
            "macro_f1": m.get("macro_f1"),
            **({"perplexity": m.get("perplexity")} if self.cfg.task in ("causal_lm", "instruction") else {}),
            **({k: m.get(k) for k in ("rougeL", "exact_match")} if self.cfg.task == "instruction" else {}),
            **({k: m.get(k) for k in RETRIEVAL_METRICS} if self.cfg.task == "retrieval" else {}),
            **({"backdoor_success": m["backdoor_success"]} if "backdoor_success" in m else {}),
            **server_log,
            # baselines communicate nothing: centralized already holds the data, local owners train alone
            "bytes_down": bytes_down if self.method == "federated" else 0,
            "bytes_up": sum(u.bytes_up for u in seen) + cl_log.get("cl_bytes_up", 0) if self.method == "federated" else 0,
            "examples": int(sum(u.metrics.get("examples_seen", 0) for u in trusted)),
            "lr": trusted[-1].metrics.get("lr") if trusted else None,
            "rejected": rejected,
            **({"skipped": True} if skipped else {}),
            **self.fault_log(picks, seen, stragglers, timing),
            **lora_log,
            **{k: v for k, v in private_log.items() if k != "secure_train_loss"},
            **self.example_privacy(r),
            **cl_log,
            "round_time_s": time.perf_counter() - t0,
        }

    def stage_groups(self, r: int) -> list[Group]:
        """The groups as they train in round ``r``: under continual learning only the owners taking part in the
        round's stage (with data for it), and a centralized budget matching those owners' work."""
        if self.cl is None:
            return self.groups
        if self.method == "centralized":
            owners = self.cl.eligible(list(range(len(self.app.split.client_names))), r)
            sizes = [len(self.app.continual.train_rows(i, self.cl.stage(r))) for i in owners]
            return [pooled_group(self.groups[0].members[0], sizes, self.cfg)]
        return [replace(g, members=self.cl.eligible(g.members, r)) for g in self.groups]

    # --- faults, attacks and update codecs ------------------------------------------------------------
    def deadline(self, r: int, group: Group, members: list[int], timing: dict) -> tuple[list[int], list[dict]]:
        """Split the sampled clients into those reporting before federation.deadline and the stragglers.

        Simulated time (``App.round_seconds``), so the split is reproducible; a straggler has received its task
        (its download is counted) but its update would arrive after the round closed, so it is not trained."""
        fed = self.cfg.federation
        if self.method != "federated" or (fed.deadline is None and fed.slowness_spread == 0):
            return members, []
        on_time, late = [], []
        for i in members:
            t = self.app.round_seconds(i, r, group.num_examples)
            if fed.deadline is not None and t > fed.deadline:
                late.append({"client": self.app.shards[i].name, "seconds": round(t, 3)})
            else:
                on_time.append(i)
                timing[self.app.shards[i].name] = t
        if late:
            log.warning("round %d: %d stragglers past the %.1f s deadline excluded: %s", r, len(late), fed.deadline,
                        ", ".join(s["client"] for s in late))
        return on_time, late

    def broadcast_bytes(self, weights: Weights, extra: dict) -> int:
        """Size of the task message one client receives (for stragglers, whose download happened)."""
        from fedfm import codec
        from fedfm.compression import cast_broadcast

        down = self.cfg.compression.down
        size = len(codec.encode(cast_broadcast(weights, down)))
        return size + (len(codec.encode(cast_broadcast(extra["control"], down))) if "control" in extra else 0)

    def fault_log(self, picks: list[list[int]], seen: list[ClientUpdate], stragglers: list[dict], timing: dict) -> dict:
        if self.method != "federated":
            return {}
        names = {self.app.shards[i].name for m in picks for i in m}
        late = {s["client"] for s in stragglers}
        out: dict[str, Any] = {"dropped": sorted(names - late - {u.client for u in seen})}
        if stragglers or timing:
            out["stragglers"] = stragglers
            # the round closes when its last on-time client reports, or at the deadline if someone is late
            last = max((timing[u.client] for u in seen if u.client in timing), default=0.0)
            out["round_sim_s"] = self.cfg.federation.deadline if stragglers else last
        if self.app.byzantine:
            out["byzantine_sampled"] = sum(1 for m in picks for i in m if i in self.app.byzantine)
        return out

    def receive(self, u: ClientUpdate, reference: Weights) -> str | None:
        """Decode what a client sent into a dense update (compressed message, own-rank LoRA factors); or why not."""
        app = self.app
        if app.codec is not None and app.uplink:
            from fedfm.compression import UpdateCodec

            if not UpdateCodec.is_message(u.delta):  # e.g. a client whose update was not finite sends it raw
                return validate(u, reference) or "expected a compressed message (compression.up is set)"
            try:
                u.delta = app.codec.decode(u.delta)
            except ValueError as exc:
                return f"malformed compressed update: {exc}"
        if app.lora_ranks is not None:
            from fedfm.lora import unpack_rank

            try:
                u.delta, rank = unpack_rank(u.delta, reference, app.lora_pairs)
            except ValueError as exc:
                return f"malformed LoRA update: {exc}"
            u.metrics["lora_rank"] = rank
        return None

    def lora_aggregation(self, weights: Weights, valid: list[ClientUpdate], out: dict) -> bool:
        """strategy.lora_aggregation other than 'separate': combine the LoRA factors of the round's updates into one
        pseudo-update (``out['_combined']``) for the strategy; under 'separate', log how far mean(B) mean(A) is from
        mean(B A). Returns whether the updates were combined."""
        mode = self.cfg.strategy.lora_aggregation
        if self.method != "federated" or not self.app.lora_pairs or not valid:
            return False
        from fedfm import lora

        if mode == "separate":
            out["lora_product_gap"] = lora.product_gap(weights, valid)
            return False
        total = float(sum(u.num_examples for u in valid))
        ranks = {u.client: int(u.metrics["lora_rank"]) for u in valid} if self.app.lora_ranks is not None else None
        if mode == "hetlora":
            delta = lora.hetlora_mean(weights, valid, ranks)
        else:  # exact, flexlora: average the products, re-factorise by truncated SVD
            delta, info = lora.exact_mean(weights, valid, ranks=ranks)
            out.update(info)
        out["_combined"] = ClientUpdate("lora-aggregate", delta, total)
        return True

    def example_privacy(self, r: int) -> dict[str, float]:
        """DP-SGD's example-level epsilon after ``r`` rounds: an upper bound over clients, as if every client had
        taken part in every round with the largest step count and the highest sampling rate of any shard."""
        c = self.cfg.dpsgd
        if not c.enabled or not c.poisson:  # fixed-size shuffled batches: the Poisson accountant does not apply
            return {}
        sizes = [self.shard_sizes(i)[0] for i in range(len(self.app.split.client_names))]
        batch = self.cfg.train.batch_size
        steps = max(math.ceil(examples_per_round(n, self.cfg.train) / batch) for n in sizes)
        return {"example_epsilon": dp.poisson_epsilon(r * steps, batch / min(sizes), c.noise_multiplier, c.delta)}

    def shard_sizes(self, i: int) -> tuple[int, int]:
        """Client ``i``'s (train, test) example counts: as its node reported them on a deployment (the owner's own
        directory), else from the simulated split."""
        reported = getattr(self.engine, "sizes", {}).get(i)
        return reported if reported is not None else (len(self.app.shards[i].train), len(self.app.shards[i].test))

    def budget_exhausted(self, done: int) -> str | None:
        """Why the next round must not run because it would exceed dp.target_epsilon, or None."""
        target = self.cfg.dp.target_epsilon
        if self.private is None or target is None:
            return None
        eps = self.private.epsilon(done + 1)
        if eps <= target:
            return None
        return f"privacy budget: round {done + 1} would reach epsilon {eps:.3f} > dp.target_epsilon {target}"

    def aggregate_with_server(self, r: int, st: ServerState, valid: list[ClientUpdate]) -> tuple[ServerState, dict]:
        """Algorithm 2: mix the server's own training into the round (its data never leaves this process).

        before: the server trains from the round's global model; its update joins the aggregate as a
          pseudo-client whose weight makes its share of the averaged update exactly ``share``;
        after: the clients are aggregated first; the server trains from the result and
          ``share`` x its update is added.
        ``share`` is ``server_data.weight``, or n_server / (n_server + sum n_clients) when unset.
        """
        sd, app = self.cfg.server_data, self.app
        budget = sd.steps * self.cfg.train.batch_size
        n_clients = float(sum(u.num_examples for u in valid))
        n_server = len(app.shards[app.server_index].train)
        share = sd.weight if sd.weight is not None else n_server / (n_server + n_clients)
        if sd.when == "before":
            su = app.client_train(app.server_index, ClientTask(r, st.weights, budget))
            new = self.strategy.aggregate(st, with_server(valid, su, share))
        else:
            new = self.strategy.aggregate(st, valid)
            su = app.client_train(app.server_index, ClientTask(r, new.weights, budget))
            new = ServerState(new.round, apply(new.weights, su.delta, share), new.opt)
        return new, {"server_share": share, "server_loss": su.metrics["train_loss"]}

    def screen(self, r: int, group: Group, reference: Weights, updates: list[ClientUpdate], rejected: list) -> list[ClientUpdate]:
        """Decode, then drop invalid updates with a logged reason; stop the round if too few valid ones remain."""
        valid = []
        expected = {**reference, **(self.strategy.extra_keys(reference) if hasattr(self.strategy, "extra_keys") else {})}
        for u in updates:
            reason = self.receive(u, reference) or validate(u, expected)
            if reason:
                log.warning("round %d: rejected update from %s: %s", r, u.client, reason)
                rejected.append({"client": u.client, "reason": reason})
            else:
                valid.append(u)
        ratio = self.cfg.federation.max_norm_ratio
        if ratio is not None and self.method == "federated":
            from fedfm.strategies.robust import norm_outliers

            # norms of the model change only (SCAFFOLD's control change is in gradient units)
            outliers = norm_outliers([replace(u, delta={k: u.delta[k] for k in reference}) for u in valid], ratio)
            for u in valid:
                if u.client in outliers:
                    log.warning("round %d: rejected update from %s: %s", r, u.client, outliers[u.client])
                    rejected.append({"client": u.client, "reason": outliers[u.client]})
            valid = [u for u in valid if u.client not in outliers]
        needed = min(self.cfg.federation.min_clients, len(group.members))
        if len(valid) < needed:
            raise TrainingError(f"round {r}: only {len(valid)} valid updates in group {group.name} (need {needed})")
        return valid

    # --- the whole run ------------------------------------------------------------------------
    def run(self, states: GroupStates, history: list[dict[str, Any]]) -> dict[str, Any]:
        wall = history[-1]["wall_time_s"] if history else 0.0
        show = self.console.is_terminal
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console) if show else nullcontext() as progress:
            rounds_bar = progress.add_task(f"{self.method} rounds", total=self.cfg.rounds, completed=states.round) if show else None
            while states.round < self.cfg.rounds:
                done = states.round
                self.stopped = self.budget_exhausted(done)
                if self.stopped:
                    log.warning("stopping before round %d: %s", done + 1, self.stopped)
                    self.console.print(f"[yellow]stopped early[/yellow] — {self.stopped}")
                    break
                try:
                    record = self.round(states, progress)
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, FedFMError) else f"{type(exc).__name__}: {exc}"
                    self.dir.set_status("incomplete", self.method, done, reason)
                    raise
                wall += record["round_time_s"]
                record["wall_time_s"] = wall
                # the record first: resume drops records past the checkpoint, but could not restore a lost one
                self.dir.append_metrics(record)
                self.dir.save_checkpoint(states, {"method": self.method, "seed": self.cfg.seed, "fedfm": __version__})
                self.dir.set_status("running", self.method, states.round)
                if show:
                    progress.advance(rounds_bar)
                else:
                    acc = "" if record["accuracy"] is None else f" acc={record['accuracy']:.3f}"
                    if record.get("recall@5") is not None:
                        acc = f" recall@5={record['recall@5']:.3f}"
                    if record.get("rougeL") is not None:
                        acc = f" ppl={record['perplexity']:.2f} rougeL={record['rougeL']:.3f}"
                    loss = "" if record["train_loss"] is None else f" loss={record['train_loss']:.4f}"
                    eps = "" if record.get("epsilon") is None else f" eps={record['epsilon']:.2f}"
                    self.console.print(f"\\[{self.method}] round {record['round']}/{self.cfg.rounds}{loss}{acc}{eps}")
        return self.finish(states, wall)

    def finish(self, states: GroupStates, wall: float) -> dict[str, Any]:
        """Final evaluation (global test in full, each client's own split), final model, summary, report."""
        app = self.app
        n = len(app.split.client_names)
        per_group, own, glob_each, samples = [], [None] * n, [None] * n, []
        for g, group in enumerate(self.groups):
            st = states[g]
            per_group.append(app.server_evaluate(st.weights, full=True))
            # federated/centralized: one model judged on every client's split; local: each client's own model
            clients = group.members if self.method == "local" else self.evaluated_clients(n)
            for i, m in zip(clients, self.engine.evaluate([(i, st.weights) for i in clients])):
                own[i], glob_each[i] = m, per_group[-1]
            self.save_final(group, st)
            if self.cfg.task == "instruction" and self.cfg.eval.samples:
                set_weights(app.model, st.weights)
                samples.append({"group": group.name, "samples": app.task.samples(app.model, app.global_test, self.cfg.eval.samples)})
        if samples:  # generated answers of each final model, shown in the run report
            atomic_write_text(self.dir.path / "samples.json", json.dumps(samples, indent=1))
        sizes = [self.shard_sizes(i) for i in range(n)]
        per_client = [
            {"client": app.shards[i].name, "n_train": sizes[i][0], "n_test": sizes[i][1], "own": own[i], "global": glob_each[i]}
            for i in range(n)
        ]
        metrics = self.dir.metrics()
        summary = {
            "method": self.method,
            "rounds": self.cfg.rounds,
            "wall_time_s": wall,
            "global": _mean(per_group),
            "own_mean": _mean([c["own"] for c in per_client if c["n_test"] > 0 and c["own"] is not None]),
            "per_client": per_client,
            "trainable_params": app.trainable_params,
            "total_params": app.total_params,
            "bytes_total": int(sum(m["bytes_down"] + m["bytes_up"] for m in metrics)),
            **({"stopped": self.stopped} if self.stopped else {}),
            **self.privacy_summary(states.round),
            **({"continual": self.cl.summary(metrics)} if self.cl else {}),
        }
        cs = app.client_states
        if cs is not None and cs.clients():  # error-feedback residuals / control variates the clients kept
            summary["client_states"] = {"clients": cs.clients(), "disk_bytes": cs.disk_bytes()}
        atomic_write_text(self.dir.path / "summary.json", json.dumps(summary, indent=1))
        shutil.rmtree(self.dir.path / "client_states", ignore_errors=True)
        shutil.rmtree(self.dir.path / "clients", ignore_errors=True)
        self.dir.set_status("complete", self.method, states.round)
        report.write_run_report(self.dir.path)
        return summary

    def evaluated_clients(self, n: int) -> list[int]:
        """The clients whose own split the final model is evaluated on: all, or a seeded eval.max_clients subset."""
        k = self.cfg.eval.max_clients
        if k is None or k >= n:
            return list(range(n))
        return sorted(np.random.default_rng(derive_seed(self.cfg.seed, 0xE7A1)).choice(n, k, replace=False).tolist())

    def privacy_summary(self, rounds: int) -> dict[str, Any]:
        """What a user can state about the run's privacy, saved in summary.json and shown in the report."""
        out: dict[str, Any] = {}
        cfg = self.cfg
        if self.private is not None and cfg.dp.active:
            out["client_dp"] = {
                "mode": cfg.dp.mode,
                "epsilon": self.private.epsilon(rounds),
                "delta": cfg.dp.delta,
                "noise_multiplier": cfg.dp.noise_multiplier,
                "sampling": cfg.federation.sampling,
                "expected_clients": self.private.expected,
                "rounds": rounds,
                "accountant": cfg.dp.accountant,
            }
        if cfg.dpsgd.enabled:
            out["example_dp"] = {"delta": cfg.dpsgd.delta, "noise_multiplier": cfg.dpsgd.noise_multiplier, **self.example_privacy(rounds)}
        if self.private is not None and cfg.secagg.enabled:
            out["secure_aggregation"] = {"graph": "complete" if cfg.secagg.neighbours is None else f"{cfg.secagg.neighbours} neighbours"}
        return out

    def save_final(self, group: Group, state: ServerState) -> None:
        path = self.dir.path / "final"
        if len(self.groups) > 1:
            path = path / group.name
        set_weights(self.app.model, state.weights)
        save_pretrained(self.app.model, self.app.tokenizer, path)


def run_method(app: App, method: str, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Start a fresh run of ``method`` in ``run_dir`` (which must not exist yet)."""
    engine_for(app)  # Ray actors / a Flower connection first: an engine that cannot start leaves no run directory
    rd = RunDir(run_dir)
    rd.create(app.cfg, method)
    runner = Runner(app, method, rd, console)
    return runner.run(runner.initial_states(), [])


def resume(app: App, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its newest checkpoint; the result equals an uninterrupted run."""
    rd = RunDir(run_dir)
    status = rd.status()
    try:
        runner = Runner(app, status["method"], rd, console)
        loaded = rd.load_checkpoint()
        if loaded is None:
            states, history = runner.initial_states(), rd.truncate_metrics(0)
        else:
            checkpoint, _meta = loaded
            if len(checkpoint) != len(runner.groups):
                raise FedFMError(f"checkpoint in {run_dir} has {len(checkpoint)} groups, the config gives {len(runner.groups)}")
            states, history = runner.restore(checkpoint), rd.truncate_metrics(checkpoint.round)
        rd.set_status("running", status["method"], states.round)
        return runner.run(states, history)
    finally:
        close_engine(app)


def default_run_dir(cfg: RunConfig, method: str | None = None) -> Path:
    base = Path(cfg.output_dir) / cfg.name
    return base if method is None else base / method


def run(cfg: RunConfig, method: str = "federated", run_dir: Path | None = None, console: Console | None = None) -> Path:
    """Python API: ``fedfm.server.run(fedfm.config.load('configs/x.yaml'))`` -> the run directory."""
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FedFMError(f"run directory {run_dir} already exists: pass --resume {run_dir} or choose another name")
    app = App(cfg)  # data and model are checked here, before the run directory is created
    try:
        run_method(app, method, run_dir, console)
    finally:
        close_engine(app)
    return run_dir


def compare(cfg: RunConfig, out_dir: Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every method in ``cfg.compare.methods`` on the same data and model; write one comparison."""
    out_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    for m in cfg.compare.methods:
        if (out_dir / m).exists() and any((out_dir / m).iterdir()):
            raise FedFMError(f"{out_dir / m} already exists: choose another name (--set name=...)")
    app = App(cfg)
    try:
        for m in cfg.compare.methods:
            run_method(app, m, out_dir / m, console)
    finally:
        close_engine(app)
    return report.write_comparison(out_dir, list(cfg.compare.methods))
