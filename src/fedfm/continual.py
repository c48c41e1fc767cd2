"""Federated continual learning: a schedule of stages inside the one round loop.

A ``continual:`` config section splits the run's rounds into stages. Each stage restricts the data to some
classes (class-incremental) or natural keys such as tweet topics (domain-incremental) and says which owners
take part (owners join and leave). The stage is a pure function of the round number, so checkpoints,
``--resume`` and seeded determinism work unchanged; every piece of per-stage server state (the anchor
weights and the accumulated federated Fisher of the quadratic penalty) lives in ``ServerState.opt`` under
``cl.`` and is checkpointed with it.

Client side (:class:`Curriculum`, owned by the App): an owner's training data at stage s is its shard
restricted to the stage's classes/keys, plus, under ``method=replay``, a bounded buffer of its own earlier
examples (reservoir sampling, a pure function of (seed, owner, data stream): nothing to save, and the buffer
never leaves the owner). Under ``ewc`` an owner computes the diagonal empirical Fisher of its trainable tensors
on its stage data at each stage end (a client function run through the engine, like training).

Server side (:class:`ContinualRun`, used by ``server.Runner``): at each stage end the global model is
evaluated on every stage's test set (a row of the accuracy matrix), and for ``ewc``/``l2sp`` the anchor and
precision for the next stages are set; the anchor and precision are sent once to each owner of the next stage,
and those bytes, like the Fisher exchange, are counted in the round's bytes.

Under ``merge`` each stage trains its own adapter (from the last stage's adapter, the merged model or the
initial one: ``continual.stage_start``); at each stage end the server folds the stage's task vector (trained minus
initial tensors) into a merged one (mean or MagMax) and serves the initial tensors plus the merge: the matrix
row is the merged model's, and after the last stage the run's model is the merged one.

Metrics (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"): the accuracy matrix R[i][j] (after stage i,
on stage j's test set), ACC, backward transfer (BWT, negative = forgetting) and forward transfer (FWT).
"""

from __future__ import annotations

import bisect
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedfm import codec
from fedfm.client import derive_seed
from fedfm.errors import ConfigError, DataError, FedFMError
from fedfm.models import set_weights, trainable_params
from fedfm.protocol import FISHER as FISHER_FUNCTION  # the owners' client function, run through engine.call
from fedfm.types import Penalty, ServerState, Weights

if TYPE_CHECKING:
    from fedfm.app import App

log = logging.getLogger("fedfm")

PREFIX = "cl."  # ServerState.opt keys owned by continual learning (stripped before the strategy sees the state)
ANCHOR, PRECISION = "cl.anchor.", "cl.precision."
MERGED, MERGED_COUNT = "cl.merged.", "cl.merged_count"  # merge: the merged task vector and how many stages it holds
ROUND_KEY, EXAMPLES_KEY = "cl.round", "cl.examples"  # scalars riding in the Fisher request / reply messages



# --------------------------------------------------------------------------- schedule and metrics (pure)


def stage_ends(stage_rounds: Sequence[int]) -> list[int]:
    """The last round of each stage: stages of 3, 2, 4 rounds end at rounds 3, 5, 9."""
    return np.cumsum(stage_rounds).astype(int).tolist()


def stage_of(round_: int, ends: Sequence[int]) -> int:
    """The 0-based stage of a 1-based round."""
    s = bisect.bisect_left(ends, round_)
    if round_ < 1 or s >= len(ends):
        raise ValueError(f"round {round_} is outside the schedule of {ends[-1]} rounds")
    return s


def transfer_metrics(matrix: Sequence[Sequence[float]], initial: Sequence[float]) -> dict[str, float]:
    """ACC, BWT and FWT of a T x T accuracy matrix (Lopez-Paz & Ranzato 2017).

    ``matrix[i][j]``: accuracy on stage j's test set after training stage i; ``initial[j]``: the untrained
    model's accuracy on it (b_j).
      ACC = 1/T sum_j R[T-1][j]                       (final accuracy over all stages)
      BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])  (how later stages changed earlier ones; < 0: forgetting)
      FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b_j)       (what earlier stages did for a stage not yet trained)
    """
    r = np.asarray(matrix, dtype=float)
    b = np.asarray(initial, dtype=float)
    t = r.shape[0]
    if r.shape != (t, t) or b.shape != (t,) or t < 2:
        raise ValueError(f"need a square matrix of at least 2 stages and one initial accuracy per stage, got {r.shape}, {b.shape}")
    return {
        "acc": float(r[-1].mean()),
        "bwt": float(np.mean(r[-1, :-1] - np.diag(r)[:-1])),
        "fwt": float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)])),
    }


def merge_task_vector(merged: Weights | None, count: int, tau: Weights, how: str) -> Weights:
    """Fold one stage's task vector ``tau`` (its trained tensors minus the initial ones) into the merge of the
    ``count`` stages before it.

    'mean' is task arithmetic with equal weights (Ilharco et al. 2023), kept as a running mean;
    'magmax' keeps, entry by entry, the value of largest magnitude over the stages (Marczak et al. 2024,
    "MagMax: Leveraging Model Merging for Seamless Continual Learning"); a tie keeps the earlier stage's value.
    Both are associative, so the server keeps one merged tensor per trainable tensor, not one per stage.
    """
    if merged is None or count == 0:
        return {k: v.clone() for k, v in tau.items()}
    if how == "mean":
        return {k: merged[k] + (tau[k] - merged[k]) / (count + 1) for k in tau}
    if how == "magmax":
        return {k: torch.where(tau[k].abs() > merged[k].abs(), tau[k], merged[k]) for k in tau}
    raise ValueError(f"unknown merge {how!r}; valid: mean, magmax")


def reservoir(chunks: Iterable[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Algorithm R (Vitter 1985) over a stream given in chunks: a uniform sample of at most ``size`` items.

    Written by hand: no library we use samples a bounded buffer from a stream. Each chunk is visited in a
    seeded random order; the result after chunks 0..s-1 is a prefix state of the result after 0..s, so an
    owner's buffer evolves stage by stage while staying a pure function of its stream and the generator's seed.
    """
    buf: list[int] = []
    seen = 0
    for chunk in chunks:
        for item in rng.permutation(np.asarray(chunk, dtype=np.int64)):
            if seen < size:
                buf.append(int(item))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < size:
                    buf[j] = int(item)
            seen += 1
    return np.sort(np.asarray(buf, dtype=np.int64))


def diagonal_fisher(model: torch.nn.Module, task, data, batch_size: int) -> Weights:
    """Diagonal empirical Fisher of the trainable tensors: the mean over examples of squared per-example gradients
    of the loss at the true labels.

    Per-example gradients come from Opacus's ``GradSampleModule`` (one batched backward pass instead of one per
    example; already fedfm's DP-SGD dependency). Opacus records activations only in modules in training mode, so
    the model is in eval mode (no dropout, deterministic) except the modules that own trainable tensors (Linear /
    Embedding / LayerNorm layers, which behave the same in both modes).
    """
    from opacus import GradSampleModule

    params = trainable_params(model)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    was_training = model.training
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
    try:
        model.eval()
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()
        for idx in torch.arange(len(data)).split(batch_size):
            task.loss(model, task.batch(data, idx)).backward()
            for k, p in params.items():
                if p.grad_sample is not None:  # None: the tensor took no part (e.g. a frozen path)
                    fisher[k] += p.grad_sample.pow(2).sum(0)
                p.grad_sample, p.grad = None, None
    finally:
        gsm._close()
        model.train(was_training)
    return {k: v / max(len(data), 1) for k, v in fisher.items()}


# --------------------------------------------------------------------------- client side: the owners' data


class Curriculum:
    """Which owners take part and which of their examples exist at each stage (built once per App).

    The stages (classes/keys/owners) are fixed when the App is built, and checked against the data then; the
    method and replay size are read from ``app.cfg`` at each call, so one App can serve runs of every method.
    """

    def __init__(self, app: App):
        self.app = app
        cfg = app.cfg.continual
        ds, sp = app.dataset, app.split
        self.ends = stage_ends([st.rounds for st in cfg.stages])
        self.n_clients = len(sp.client_names)
        self.masks: list[np.ndarray] = []  # per stage: which dataset examples belong to it
        self.present: list[set[int]] = []  # per stage: the owners (client indices) taking part
        for s, st in enumerate(cfg.stages):
            mask = np.ones(len(ds), dtype=bool)
            if st.labels is not None:
                mask &= np.isin(ds.labels, [self._lookup(s, "labels", x, ds.label_names) for x in st.labels])
            if st.keys is not None:
                if ds.keys is None:
                    raise ConfigError(
                        f"continual.stages[{s}].keys needs natural owner keys, which data.source={app.cfg.data.source} "
                        "does not have (use labels, or a source with keys such as tweets topics)"
                    )
                valid = sorted({str(k) for k in ds.keys})
                mask &= np.isin(ds.keys.astype(str), [valid[self._lookup(s, "keys", x, valid)] for x in st.keys])
            self.masks.append(mask)
            names = sp.client_names
            self.present.append(
                set(range(self.n_clients)) if st.clients is None else {self._client(s, c, names) for c in st.clients}
            )
        self.train_idx = [np.asarray(t) for t in sp.client_train]
        self._buffers: dict[tuple[int, int, int], np.ndarray] = {}  # (owner, stage, size) -> buffer rows
        self.test_sets = [app.global_test.subset(np.flatnonzero(m[sp.global_test])) for m in self.masks]
        for s in range(len(self.masks)):
            if len(self.test_sets[s]) == 0:
                raise DataError(f"continual stage {s}: the global test set has no example of this stage")
            if not any(self.eligible(i, s) for i in range(self.n_clients)):
                raise DataError(f"continual stage {s}: no owner taking part has a training example of this stage")

    @staticmethod
    def _lookup(s: int, field: str, name: str, valid: list[str]) -> int:
        if name not in valid:
            raise ConfigError(f"continual.stages[{s}].{field}: unknown name {name!r}; valid: {', '.join(valid)}")
        return valid.index(name)

    @staticmethod
    def _client(s: int, c: int | str, names: list[str]) -> int:
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise ConfigError(f"continual.stages[{s}].clients: index {c} out of range 0..{len(names) - 1}")
            return c
        if c not in names:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"continual.stages[{s}].clients: unknown client {c!r}; valid: {shown} (or indices)")
        return names.index(c)

    @property
    def num_stages(self) -> int:
        return len(self.ends)

    def stage(self, round_: int) -> int:
        return stage_of(round_, self.ends)

    # --- an owner's examples (positions in its shard's train set) ----------------------------------
    def stage_rows(self, index: int, s: int) -> np.ndarray:
        """Positions in participant ``index``'s training set that belong to stage ``s`` (none if it is absent)."""
        if index < self.n_clients:
            if index not in self.present[s]:
                return np.empty(0, dtype=np.int64)
            return np.flatnonzero(self.masks[s][self.train_idx[index]])
        return self._pooled(lambda i: self.stage_rows(i, s), index, s)

    def buffer(self, index: int, s: int) -> np.ndarray:
        """Owner ``index``'s replay buffer at the start of stage ``s``: a reservoir of at most
        ``continual.replay_size`` of the examples it held in the stages before ``s`` (each example streamed
        the first time it belongs to a stage the owner takes part in)."""
        size = self.app.cfg.continual.replay_size
        key = (index, s, size)
        if key not in self._buffers:
            seen = np.zeros(len(self.train_idx[index]), dtype=bool)
            chunks = []
            for t in range(s):
                rows = self.masks[t][self.train_idx[index]]
                if index in self.present[t]:
                    chunks.append(np.flatnonzero(rows & ~seen))
                    seen |= rows
            rng = np.random.default_rng(derive_seed(self.app.cfg.seed, index, 0xB0F))
            self._buffers[key] = reservoir(chunks, size, rng)
        return self._buffers[key]

    def train_rows(self, index: int, s: int) -> np.ndarray:
        """What participant ``index`` trains on at stage ``s``: its stage data, plus its buffer under replay.
        The centralized participant trains on the union of the present owners' data (and buffers)."""
        if index >= self.n_clients:
            return self._pooled(lambda i: self.train_rows(i, s), index, s)
        rows = self.stage_rows(index, s)
        if self.app.cfg.continual.method == "replay" and len(rows):
            rows = np.union1d(rows, self.buffer(index, s))
        return rows

    def _pooled(self, rows_of, index: int, s: int) -> np.ndarray:
        """Rows of the centralized participant: its shard is the clients' shards concatenated in order."""
        if self.app.shards[index].name != "pooled":
            raise FedFMError(f"continual learning has no stage data for participant {self.app.shards[index].name!r}")
        offsets = np.cumsum([0, *map(len, self.train_idx)])
        return np.concatenate([offsets[i] + rows_of(i) for i in range(self.n_clients) if i in self.present[s]])

    def eligible(self, index: int, s: int) -> bool:
        """Whether participant ``index`` takes part in stage ``s``: present, with something to train on."""
        return len(self.train_rows(index, s)) > 0

    def train_data(self, index: int, round_: int):
        return self.app.shards[index].train.subset(self.train_rows(index, self.stage(round_)))

    # --- the Fisher, computed at an owner --------------------------------------------------------
    def fisher_reply(self, index: int, request: bytes) -> bytes:
        """An owner's diagonal empirical Fisher on (up to ``continual.fisher_examples`` of) its stage data, at the
        weights in ``request``; the reply carries the number of examples used (the server's averaging weight)."""
        msg = codec.decode(request)
        round_ = int(msg.pop(ROUND_KEY).item())
        s = self.stage(round_)
        rows = self.stage_rows(index, s)
        cap = self.app.cfg.continual.fisher_examples
        if len(rows) > cap:  # a seeded subset: a pure function of (seed, stage, owner)
            rows = np.sort(np.random.default_rng(derive_seed(self.app.cfg.seed, s, index, 0xF15)).choice(rows, cap, replace=False))
        set_weights(self.app.model, msg)
        data = self.app.shards[index].train.subset(rows)
        fisher = diagonal_fisher(self.app.model, self.app.task, data, self.app.cfg.train.batch_size)
        return codec.encode({**fisher, EXAMPLES_KEY: torch.tensor([float(len(rows))])})

    def replay_memory(self) -> dict[str, Any]:
        """What replay costs each owner after the last stage: buffered examples and their text in UTF-8 bytes."""
        end = self.num_stages
        counts, sizes = [], []
        for i in range(self.n_clients):
            rows = self.buffer(i, end)
            counts.append(len(rows))
            sizes.append(sum(len(self.app.dataset.texts[j].encode()) for j in self.train_idx[i][rows]))
        return {
            "replay_size": self.app.cfg.continual.replay_size,
            "examples_total": int(sum(counts)),
            "examples_max_per_owner": int(max(counts)),
            "text_bytes_total": int(sum(sizes)),
            "text_bytes_max_per_owner": int(max(sizes)),
        }

    def describe(self) -> list[dict[str, Any]]:
        names = self.app.split.client_names
        stages = self.app.cfg.continual.stages
        return [
            {"rounds": st.rounds, "labels": st.labels, "keys": st.keys, "clients": [names[i] for i in sorted(self.present[s])],
             "test_examples": len(self.test_sets[s])}
            for s, st in enumerate(stages)
        ]


# --------------------------------------------------------------------------- server side


def strip(opt: Weights) -> tuple[Weights, Weights]:
    """(the strategy's own state, the continual-learning state): strategies stay pure functions of their keys."""
    return {k: v for k, v in opt.items() if not k.startswith(PREFIX)}, {k: v for k, v in opt.items() if k.startswith(PREFIX)}


class ContinualRun:
    """The stage-aware parts of ``server.Runner``: penalty config, stage-end evaluation and Fisher/anchor update."""

    def __init__(self, app: App, method: str):
        if app.continual is None:
            raise FedFMError("continual learning needs an App built with continual.stages")
        self.app, self.cfg, self.run_method = app, app.cfg.continual, method
        self.cur: Curriculum = app.continual
        self.federated = method == "federated"

    def stage(self, round_: int) -> int:
        return self.cur.stage(round_)

    def is_end(self, round_: int) -> bool:
        return round_ in self.cur.ends

    def eligible(self, members: list[int], round_: int) -> list[int]:
        s = self.stage(round_)
        return [i for i in members if self.cur.eligible(i, s)]

    def client_config(self, opt: Weights) -> dict[str, Any]:
        """The quadratic penalty of the clients' loss (ewc, l2sp) once a stage has ended; else nothing."""
        if self.cfg.method not in ("ewc", "l2sp") or not any(k.startswith(ANCHOR) for k in opt):
            return {}
        anchor = {k[len(ANCHOR):]: v for k, v in opt.items() if k.startswith(ANCHOR)}
        precision = {k[len(PRECISION):]: v for k, v in opt.items() if k.startswith(PRECISION)} or None
        return {"penalty": Penalty(anchor, self.cfg.penalty, precision)}

    def broadcast_bytes(self, round_: int, states, groups) -> int:
        """Bytes of sending the anchor (and precision) once to every owner of a new stage, at its first round
        (owners keep them for the stage; the server's copy is the checkpointed ``cl.`` state)."""
        if not self.federated or round_ == 1 or self.stage(round_ - 1) == self.stage(round_):
            return 0
        total = 0
        for g, group in enumerate(groups):
            penalty = self.client_config(states[g].opt).get("penalty")
            if penalty is not None:
                message = {**penalty.anchor, **{f"precision.{k}": v for k, v in (penalty.precision or {}).items()}}
                total += len(codec.encode(message)) * len(group.members)
        return total

    def evaluate(self, weights: Weights) -> list[float]:
        """Accuracy of ``weights`` on every stage's test set (the global test set restricted to the stage)."""
        set_weights(self.app.model, weights)
        bs = self.app.cfg.eval.batch_size
        return [self.app.task.evaluate(self.app.model, t, bs)["accuracy"] for t in self.cur.test_sets]

    def after_round(self, round_: int, states, groups, engine) -> dict[str, Any]:
        """Stage bookkeeping after a round's aggregation: the round-1 baseline b, and at a stage end the matrix row
        and the next stages' anchor (and federated Fisher). ``states`` is updated in place; returns the record."""
        s = self.stage(round_)
        record: dict[str, Any] = {"stage": s}
        if round_ == 1:
            record["initial_stage_accuracy"] = self.evaluate(self.app.initial_weights)
        down, up = self.broadcast_bytes(round_, states, groups), 0
        if self.is_end(round_):
            record["stage_accuracy"], down, up = self.stage_end(round_, states, groups, engine, down, up)
        if down or up:
            record["cl_bytes_down"], record["cl_bytes_up"] = down, up
        return record

    def stage_end(self, round_: int, states, groups, engine, down: int, up: int) -> tuple[list[float], int, int]:
        """The matrix row of this stage (mean over groups) and, before a next stage, its anchor (and Fisher)."""
        s = self.stage(round_)
        rows = []
        for g, group in enumerate(groups):
            st = states[g]
            if self.cfg.method == "merge":
                st = states[g] = self.merge_stage(s, st, trained=bool(group.members))
                rows.append(self.evaluate(self.served(st)))
                continue
            rows.append(self.evaluate(st.weights))
            if s == self.cur.num_stages - 1 or self.cfg.method not in ("ewc", "l2sp"):
                continue
            own, cl = strip(st.opt)
            cl = {k: v for k, v in cl.items() if not k.startswith(ANCHOR)}
            cl.update({ANCHOR + k: v.clone() for k, v in st.weights.items()})
            if self.cfg.method == "ewc" and group.members:
                fisher, d, u = self.federated_fisher(round_, st.weights, group.members, engine)
                if self.federated:  # baselines communicate nothing
                    down, up = down + d, up + u
                for k, f in fisher.items():  # online EWC: the stages' Fishers add up, the anchor is the latest model
                    cl[PRECISION + k] = cl[PRECISION + k] + f if PRECISION + k in cl else f
            states[g] = ServerState(st.round, st.weights, {**own, **cl})
        return np.mean(rows, axis=0).tolist(), down, up

    def served(self, st: ServerState) -> Weights:
        """merge: the model a stage end serves, the initial tensors plus the merged task vector."""
        init = self.app.initial_weights
        return {k: init[k] + st.opt[MERGED + k] for k in st.weights}

    def merge_stage(self, s: int, st: ServerState, trained: bool = True) -> ServerState:
        """merge, at the end of stage ``s``: fold the stage's adapter into the merged task vector, and set the
        weights the next stage starts from (continual.stage_start); after the last stage, the merged model.
        A group that sat the stage out (``trained`` False: a local owner absent from it) folds nothing in.

        The merge runs at the server on the stage's aggregated model, so it costs no communication; the server
        keeps one extra copy of the trainable tensors (the merged task vector)."""
        own, cl = strip(st.opt)
        init = self.app.initial_weights
        tau = {k: v - init[k] for k, v in st.weights.items()}
        count = int(cl[MERGED_COUNT].item()) if MERGED_COUNT in cl else 0
        prev = {k[len(MERGED):]: v for k, v in cl.items() if k.startswith(MERGED)} or None
        if trained:
            merged, count = merge_task_vector(prev, count, tau, self.cfg.merge), count + 1
        else:
            merged = prev or {k: torch.zeros_like(v) for k, v in tau.items()}
        cl = {**cl, **{MERGED + k: v for k, v in merged.items()}, MERGED_COUNT: torch.tensor([count])}
        opt = {**own, **cl}
        served = {k: init[k] + merged[k] for k in st.weights}
        if s == self.cur.num_stages - 1 or self.cfg.stage_start == "merged":
            weights = served
        elif self.cfg.stage_start == "fresh":
            weights = {k: v.clone() for k, v in init.items()}
        else:  # previous: the next stage continues from this stage's own adapter
            weights = st.weights
        return ServerState(st.round, weights, opt)

    def federated_fisher(self, round_: int, weights: Weights, members: list[int], engine) -> tuple[Weights, int, int]:
        """Each owner's Fisher at the stage-end global model, averaged with example weights (bytes down, up)."""
        request = codec.encode({**weights, ROUND_KEY: torch.tensor([round_])})
        replies, down, up = engine.call(FISHER_FUNCTION, [(i, request) for i in members])
        total, acc = 0.0, {k: torch.zeros_like(v) for k, v in weights.items()}
        for i in sorted(replies):  # fixed order: the sum does not depend on the order replies arrive
            try:
                msg = codec.decode(replies[i])
                n = float(msg.pop(EXAMPLES_KEY).item())
            except (ValueError, KeyError) as exc:
                log.warning("round %d: rejected Fisher of client %d: %s", round_, i, exc)
                continue
            bad = msg.keys() != weights.keys() or any(
                msg[k].shape != v.shape or not torch.isfinite(msg[k]).all() or (msg[k] < 0).any() for k, v in weights.items()
            )
            if bad or not n > 0:
                log.warning("round %d: rejected Fisher of client %d: names, shapes or values are invalid", round_, i)
                continue
            total += n
            for k in acc:
                acc[k] += n * msg[k]
        if total == 0:
            raise FedFMError(f"round {round_}: no owner returned a valid Fisher estimate")
        return {k: v / total for k, v in acc.items()}, down, up

    def summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json's ``continual`` entry, from the metrics records (so a resumed run reports the same)."""
        matrix = [m["stage_accuracy"] for m in metrics if m.get("stage_accuracy") is not None]
        initial = next((m["initial_stage_accuracy"] for m in metrics if m.get("initial_stage_accuracy")), None)
        complete = initial is not None and len(matrix) == self.cur.num_stages
        out: dict[str, Any] = {
            "method": self.cfg.method,
            "stages": self.cur.describe(),
            "matrix": matrix,
            "initial": initial,
            **(transfer_metrics(matrix, initial) if complete else {"acc": None, "bwt": None, "fwt": None}),
            "bytes_down": int(sum(m.get("cl_bytes_down", 0) for m in metrics)),
            "bytes_up": int(sum(m.get("cl_bytes_up", 0) for m in metrics)),
        }
        if self.cfg.method == "replay":
            out["replay"] = self.cur.replay_memory()
        if self.cfg.method in ("ewc", "l2sp"):
            out["penalty"] = self.cfg.penalty
        if self.cfg.method == "merge":
            out["merge"], out["stage_start"] = self.cfg.merge, self.cfg.stage_start
        return out
