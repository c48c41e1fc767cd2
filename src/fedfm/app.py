"""The federated application: data, model and task for one config, and the client/server functions.

An ``App`` is what every engine runs. It owns one base model (loaded once per process) and each
client's tokenised shard; ``client_train`` / ``client_evaluate`` are the functions executed "at a
client", ``server_evaluate`` the one executed at the server on the global test split. Engines only
decide where and when these run and carry their inputs and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedfm import client as client_loop
from fedfm.config import RunConfig
from fedfm.data import FederatedSplit, TextDataset, load_dataset, split
from fedfm.models import (
    count_params,
    get_weights,
    load_causal_lm,
    load_classifier,
    load_lm_tokenizer,
    load_tokenizer,
    set_weights,
)
from fedfm.tasks.causal_lm import Blocks, CausalLMTask, pack
from fedfm.tasks.classification import ClassificationTask, Encoded, encode
from fedfm.types import ClientTask, ClientUpdate, Weights


@dataclass
class Shard:
    """One participant's data: what it trains on and what it is evaluated on."""

    name: str
    train: Encoded | Blocks
    test: Encoded | Blocks


class App:
    """Everything a run needs, built once from a ``RunConfig`` (data checked before any training)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        self.dataset: TextDataset = load_dataset(cfg.data, cfg.seed)
        self.split: FederatedSplit = split(
            self.dataset, cfg.data, cfg.federation.num_clients, cfg.seed, cfg.server_data.fraction
        )
        if cfg.task == "classification":
            self.tokenizer = load_tokenizer(cfg.model.source)
            encoded = encode(self.tokenizer, self.dataset.texts, self.dataset.labels, cfg.data.max_length)
            data = encoded.subset
            self.task = ClassificationTask(len(self.dataset.label_names))
            self.model = load_classifier(cfg.model.source, self.dataset.label_names, cfg.peft, cfg.seed)
        else:
            texts = self.dataset.texts
            # a trained BPE sees the training pool only (clients' and server's training text), never test text
            pool = [texts[i] for part in (*self.split.client_train, self.split.server) for i in part]
            self.tokenizer = load_lm_tokenizer(cfg.model.source, cfg.model.tokenizer, pool, cfg.model.vocab_size)

            def data(idx):  # each participant's documents packed on their own: no block spans two owners
                return pack(self.tokenizer, [texts[i] for i in idx], cfg.data.max_length)

            self.task = CausalLMTask()
            self.model = load_causal_lm(cfg.model.source, self.tokenizer, cfg.model.arch, cfg.peft, cfg.seed)
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
        if cfg.task == "classification":
            # the federation's label distribution, from the counts clients report (logit adjustment)
            counts = (torch.bincount(s.train.labels, minlength=self.task.num_labels) for s in self.client_shards)
            self.label_counts = sum(counts)
            self._logit_offsets: dict[int, torch.Tensor] = {}
        self.initial_weights: Weights = get_weights(self.model)
        self.trainable_params, self.total_params = count_params(self.model)

    @property
    def client_shards(self) -> list[Shard]:
        """The clients' shards (the server's and the pooled baseline's, when present, come after them)."""
        return self.shards[: len(self.split.client_names)]

    def _eval_subset(self, cfg: RunConfig) -> Encoded:
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
        shard = self.shards[index]
        offset = None
        if self.cfg.train.logit_adjustment and self.cfg.task == "classification":
            if index not in self._logit_offsets:  # a shard's labels never change: computed once per participant
                self._logit_offsets[index] = self.task.logit_offset(shard.train.labels, self.label_counts)
            offset = self._logit_offsets[index]
        return client_loop.train(
            self.model, shard.train, self.task, task, self.cfg.train, self.cfg.rounds, self.cfg.seed, index, shard.name, offset
        )

    def client_evaluate(self, index: int, weights: Weights) -> dict[str, float]:
        set_weights(self.model, weights)
        return self.task.evaluate(self.model, self.shards[index].test, self.cfg.eval.batch_size)

    # --- functions executed at the server -----------------------------------------------------
    def server_evaluate(self, weights: Weights, full: bool = False) -> dict[str, float]:
        set_weights(self.model, weights)
        data = self.global_test if full else self.eval_subset
        return self.task.evaluate(self.model, data, self.cfg.eval.batch_size)
