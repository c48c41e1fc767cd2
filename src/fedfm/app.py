"""The federated application: data, model and task for one config, and the client/server functions.

An ``App`` is what every engine runs. It owns one base model (loaded once per process) and each client's
tokenised shard; ``client_train`` / ``client_evaluate`` / ``call`` are the functions executed "at a client",
``server_evaluate`` the one executed at the server on the global test split. Engines only decide where and when
these run and carry their inputs and outputs. The features switched on by the config (``fedfm.registry``) shape
what a client trains on and what leaves it, each through its client hooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedfm import client as client_loop
from fedfm.config import RunConfig
from fedfm.continual import Curriculum
from fedfm.data import FederatedSplit, TextDataset, load_dataset, split
from fedfm.errors import ConfigError
from fedfm.features.base import ClientRound, Feature
from fedfm.lora import lora_pairs
from fedfm.models import count_params, get_weights, set_weights
from fedfm.owner import load_coordinator, load_owner
from fedfm.placement import placement
from fedfm.registry import build_features
from fedfm.store import ClientStates
from fedfm.tasks import build_task
from fedfm.tasks.causal_lm import Blocks
from fedfm.tasks.classification import Encoded
from fedfm.tasks.instruction import Dialogs
from fedfm.tasks.retrieval import Pairs
from fedfm.types import ClientTask, ClientUpdate, Weights

log = logging.getLogger("fedfm")


@dataclass
class Shard:
    """One participant's data: what it trains on and what it is evaluated on."""

    name: str
    train: Encoded | Blocks | Pairs | Dialogs
    test: Encoded | Blocks | Pairs | Dialogs


class App:
    """Everything a run needs, built once from a ``RunConfig`` (data checked before any training)."""

    def __init__(self, cfg: RunConfig, owner: Path | None = None, coordinator: dict | None = None):
        """``owner``: build the App of one data owner from its private directory (``fedfm.owner``), as a Flower
        ClientApp does; its own shard sits at its federation index and every other client's is empty.
        ``coordinator``: build the Flower coordinator's App, which holds no owner data (``names`` and
        ``label_names`` as the owners' nodes reported them, ``test_file`` its own test set or None)."""
        self.features: list[Feature] = []
        self.cfg = cfg
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        # device and precision first: a device this machine does not have stops the run before any data loads
        self.placement = placement(cfg.train.device, cfg.model.dtype, cfg.train.mixed_precision)
        self.owner: dict | None = None
        self.evaluate_at_owners = None  # set by an engine when the global test set is the owners' (Flower, no file)
        if owner is None and coordinator is not None:
            if cfg.task == "causal_lm" and cfg.model.source == "scratch" and cfg.model.tokenizer == "bpe":
                raise ConfigError("a coordinator without data cannot train the BPE tokenizer: use a packaged "
                                  "tokenizer (model.tokenizer)")
            self.dataset, self.split = load_coordinator(cfg, coordinator["names"], coordinator["label_names"],
                                                        coordinator.get("test_file"))
        elif owner is None:
            self.dataset: TextDataset = load_dataset(cfg.data, cfg.seed, cfg.task)
            self.split: FederatedSplit = split(
                self.dataset, cfg.data, cfg.federation.num_clients, cfg.seed, cfg.server_data.fraction
            )
        else:
            if cfg.task == "causal_lm" and cfg.model.source == "scratch" and cfg.model.tokenizer == "bpe":
                raise ConfigError("a deployed owner cannot train the BPE tokenizer on everyone's text: use a packaged "
                                  "tokenizer (model.tokenizer)")
            self.dataset, self.split, self.owner = load_owner(owner, cfg)
        self.tokenizer, self.task, self.model, data = build_task(cfg, self.dataset, self.split, self.placement)
        self.shards = [
            Shard(name, data(tr), data(te))
            for name, tr, te in zip(self.split.client_names, self.split.client_train, self.split.client_test)
        ]
        self.global_test = data(self.split.global_test)
        self.server_index: int | None = None  # Algorithm 2: the server's own data, never sent anywhere
        if len(self.split.server):
            self.shards.append(Shard("server", data(self.split.server), data(self.split.server[:0])))
            self.server_index = len(self.shards) - 1
        self.eval_subset = self._eval_subset(cfg)
        self.initial_weights: Weights = get_weights(self.model)
        self.trainable_params, self.total_params = count_params(self.model)
        self.lora_pairs = self._lora_pairs(cfg)  # LoRA module -> (A, B) names of the trainable factors
        # continual learning: which owners and examples take part in each stage (checked against the data here)
        self.continual: Curriculum | None = Curriculum(self) if cfg.continual.active else None
        # each client's private state across rounds (error feedback, control variates, AdamW moments, noise
        # secret), on disk: the round loop points this at the run directory; only sampled clients' are ever read
        self.client_states: ClientStates | None = None
        self.uplink = True  # whether client_train's output is sent to a server (the round loop sets it per method)
        self._set_up_features()

    @property
    def cfg(self) -> RunConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: RunConfig) -> None:
        """A new config for the same data and model (benchmarks and tests reuse a loaded App across configs): the
        features are set up again for it; data, model and what a feature did to the data once (a simulated attack's
        poisoned shards) stay as built."""
        self._cfg = cfg
        if getattr(self, "_protocol", None) is not None:  # set up already (not while __init__ runs)
            if cfg.continual.active and self.continual is None:
                self.continual = Curriculum(self)
            self._set_up_features()

    def _set_up_features(self) -> None:
        self.features = build_features(self.cfg, self)
        self._protocol = {name: fn for f in self.features for name, fn in f.protocol().items()}

    def _lora_pairs(self, cfg: RunConfig) -> dict[str, tuple[str, str]]:
        if cfg.peft.method != "lora":
            return {}
        try:
            return lora_pairs(self.initial_weights)
        except ValueError as exc:  # a factor frozen by peft.freeze (FFA-LoRA freezes A): no pairs to combine
            if cfg.federation.lora_ranks is not None or cfg.strategy.lora_aggregation != "separate":
                raise ConfigError(f"federation.lora_ranks / strategy.lora_aggregation need both LoRA factors "
                                  f"trainable: {exc}") from None
            return {}

    def feature(self, kind: type[Feature]) -> Feature | None:
        """The active feature of class ``kind`` (None when the config does not switch it on)."""
        return next((f for f in self.features if isinstance(f, kind)), None)

    @property
    def client_shards(self) -> list[Shard]:
        """The clients' shards (the server's and the pooled baseline's, when present, come after them)."""
        return self.shards[: len(self.split.client_names)]

    def _eval_subset(self, cfg: RunConfig) -> Encoded | Blocks | Pairs | Dialogs:
        n = len(self.global_test)
        if cfg.eval.max_examples is None or cfg.eval.max_examples >= n:
            return self.global_test
        idx = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.eval.max_examples, replace=False))
        return self.global_test.subset(idx)

    def add_pooled_shard(self) -> int:
        """Append the centralized baseline's participant: all clients' training data pooled."""
        clients = self.client_shards
        pooled = type(clients[0].train).cat([s.train for s in clients])
        self.shards.append(Shard("pooled", pooled, self.global_test.subset([])))
        return len(self.shards) - 1

    # --- functions executed at a client -------------------------------------------------------
    def client_train(self, index: int, task: ClientTask) -> ClientUpdate:
        """Train one round and prepare what leaves the client: each feature's ``client_before``, the training loop,
        each feature's ``client_after`` (in registry order: control change, attack, own rank, compression with error
        feedback, DP noise and mask), then the client's private state is kept for its next round."""
        name = self.shards[index].name
        # what a real client sends is compressed / attacked; the baselines and the server's own data send nothing
        sends = self.uplink and index < len(self.split.client_names)
        states = self.client_states
        c = ClientRound(index, name, task, sends, self.shards[index].train,
                        lambda: (states.get(name, task.round) if states is not None else None) or {})
        try:
            for f in self.features:
                f.client_before(c)
            update = self._train(c)
        finally:
            for undo in c.cleanups:
                undo()
        c.finite = all(bool(torch.isfinite(v).all()) for v in update.delta.values())
        for f in self.features:
            update = f.client_after(c, update)
        # nothing from a non-finite round is kept (the previous state stays in force); what this round did not
        # refresh carries over
        finite = c.finite and all(bool(torch.isfinite(v).all()) for v in c.new_state.values())
        if c.new_state and finite and states is not None:
            states.put(name, task.round, {**c.state, **c.new_state})
        return update

    def _train(self, c: ClientRound) -> ClientUpdate:
        return client_loop.train(
            self.model, c.data, self.task, c.task, self.cfg.train, self.cfg.rounds, self.cfg.seed, c.index, c.name,
            c.loss, self.cfg.dpsgd, c.control, c.optimizer_state, c.noise_seed,
        )

    def call(self, fn: str, index: int, payload: bytes) -> bytes:
        """A protocol step at client ``index`` (secure aggregation's, continual learning's Fisher), by name."""
        if fn not in self._protocol:
            raise ValueError(f"client function {fn!r} is not served by this run's features")
        return self._protocol[fn](index, payload)

    def client_evaluate(self, index: int, weights: Weights) -> dict[str, float]:
        set_weights(self.model, weights)
        return self.task.evaluate(self.model, self.shards[index].test, self.cfg.eval.batch_size)

    # --- functions executed at the server -----------------------------------------------------
    def server_evaluate(self, weights: Weights, full: bool = False) -> dict[str, float]:
        if not len(self.global_test) and self.evaluate_at_owners is not None:  # a coordinator with no test set
            out = self.evaluate_at_owners(weights)
        else:
            set_weights(self.model, weights)
            data = self.global_test if full else self.eval_subset
            out = self.task.evaluate(self.model, data, self.cfg.eval.batch_size)
        for f in self.features:
            f.evaluated(weights, out)
        return out

