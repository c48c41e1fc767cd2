"""``personal``: each owner ends with a model of its own as well as the shared one.

- fedper (FedPer, Arivazhagan et al. 2019; FedRep's body/head split, Collins et al. 2021): the tensors matching
  ``personal.keep`` stay at the owner. Each round it trains from the global tensors with its own kept ones put
  back, keeps the trained kept tensors in its private state and sends only the rest; the server reads a missing
  kept tensor as no change, so the shared model's copy stays as initialised.
- ditto (Li et al., ICML 2021): after its round of global training each owner trains its personal copy of the
  trainable tensors, kept in its private state, on its loss plus ditto_lambda / 2 x ||v - w||^2, w the round's
  global tensors (continual learning's quadratic ``Penalty``).
- finetune: after the last round each owner fine-tunes the final global model on its own training data.

After the last round the server asks every owner, through the engine (``fedfm.protocol.PERSONALIZE``), to build its
personal model from the final global one, score it on its own test split and save it in Hugging Face format under
``personal/<owner>/`` beside its private state; the reply carries the scores only. Personal tensors never leave the
owner.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from fedfm import client as client_loop
from fedfm import codec
from fedfm.errors import ConfigError
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.models import save_pretrained, set_weights
from fedfm.protocol import PERSONALIZE
from fedfm.round.record import mean_metrics
from fedfm.types import ClientTask, ClientUpdate, Penalty, Weights

KEY = "personal."  # the prefix of personal tensors in a client's private state


class Personal(Feature):
    name = "personal"
    federated_only = True

    def __init__(self, app):
        self.app, p = app, app.cfg.personal
        self.kept: list[str] = []
        if p.method == "fedper":
            self.kept = [n for n in app.initial_weights if any(s in n for s in p.keep)]
            if not self.kept:
                raise ConfigError(f"personal.keep {p.keep} matches no trainable tensor")
            if len(self.kept) == len(app.initial_weights):
                raise ConfigError(f"personal.keep {p.keep} keeps every trainable tensor: nothing would be shared")

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.personal.active

    # --- every round, at the owner --------------------------------------------------------------
    def client_before(self, c: ClientRound) -> None:
        own = {n: c.state[KEY + n] for n in self.kept if KEY + n in c.state} if c.sends else {}
        if own:
            c.task = replace(c.task, weights={**c.task.weights, **own})

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        if not c.sends or not c.finite:
            return update
        if self.kept:
            c.new_state.update({KEY + n: c.task.weights[n] + update.delta[n] for n in self.kept})
            return replace(update, delta={k: v for k, v in update.delta.items() if k not in self.kept})
        if self.app.cfg.personal.method == "ditto":
            c.new_state.update(self.ditto(c))
        return update

    def ditto(self, c: ClientRound) -> Weights:
        """One round of the personal copy: from where the owner left it, pulled toward this round's global model."""
        app, w = self.app, c.task.weights
        v = {n: c.state.get(KEY + n, t) for n, t in w.items()}
        pull = Penalty(anchor=w, coefficient=app.cfg.personal.ditto_lambda)
        task = ClientTask(c.task.round, v, c.task.num_examples, config={**c.task.config, "penalty": pull})
        out = client_loop.train(app.model, c.data, app.task, task, app.cfg.train, app.cfg.rounds, app.cfg.seed,
                                c.index, c.name, c.loss)
        return {KEY + n: v[n] + out.delta[n] for n in v}

    def decode(self, ctx: RoundContext, update: ClientUpdate, reference: Weights) -> str | None:
        """A kept tensor the owner did not send is no change to the shared one."""
        for n in self.kept:
            if n not in update.delta and n in reference:
                update.delta[n] = torch.zeros_like(reference[n])
        return None

    # --- after the last round ---------------------------------------------------------------------
    def finished(self, runner, states) -> dict[str, Any]:
        """Every owner builds, scores and saves its personal model; the scores, by owner, mean and worst."""
        members = sorted({i for g in runner.groups for i in g.members if i < len(self.app.split.client_names)})
        group_of = {i: g for g, grp in enumerate(runner.groups) for i in grp.members}
        jobs = [(i, codec.encode(states[group_of[i]].weights)) for i in members]
        replies, _down, _up = runner.engine.call(PERSONALIZE, jobs)
        per_client = []
        for i in sorted(replies):
            metrics = {k: float(v.item()) for k, v in codec.decode(replies[i]).items()}
            per_client.append({"client": self.app.shards[i].name, **metrics})
        key = "accuracy" if self.app.cfg.task == "classification" else "perplexity" if self.app.cfg.task == "causal_lm" \
            else "loss"
        scored = [c for c in per_client if math.isfinite(c.get(key, math.nan))]  # owners with a test split
        worst = (min if key == "accuracy" else max)(scored, key=lambda c: c[key]) if scored else None
        return {"personal": {
            "method": self.app.cfg.personal.method,
            "own_mean": mean_metrics([{k: v for k, v in c.items() if k != "client"} for c in scored]),
            "worst": worst, "per_client": per_client, "saved": "personal/<owner>/",
        }}

    def personal_weights(self, index: int, weights: Weights) -> Weights:
        """The owner's personal model: the final global tensors with its own put in, or fine-tuned from them."""
        app, p = self.app, self.app.cfg.personal
        name = app.shards[index].name
        if p.method == "finetune":
            cfg = app.cfg.train.model_copy(update={"local_steps": p.finetune_steps, "schedule": "constant",
                                                   "warmup_fraction": 0.0, "lr": p.finetune_lr or app.cfg.train.lr})
            task = ClientTask(app.cfg.rounds + 1, weights)
            out = client_loop.train(app.model, app.shards[index].train, app.task, task, cfg, app.cfg.rounds + 1,
                                    app.cfg.seed, index, name)
            return {n: weights[n] + out.delta[n] for n in weights}
        state = app.client_states.get(name, app.cfg.rounds + 1) if app.client_states is not None else None
        own = {n[len(KEY):]: t for n, t in (state or {}).items() if n.startswith(KEY) and n[len(KEY):] in weights}
        return {**weights, **own}

    def reply(self, index: int, request: bytes) -> bytes:
        """At an owner: its personal model scored on its own test split, and saved beside its private state."""
        app = self.app
        personal = self.personal_weights(index, codec.decode(request))
        set_weights(app.model, personal)
        metrics = app.task.evaluate(app.model, app.shards[index].test, app.cfg.eval.batch_size)
        if app.client_states is not None:
            save_pretrained(app.model, app.tokenizer, app.client_states.dir.parent / "personal" / app.shards[index].name)
        return codec.encode({k: torch.tensor([float(v)]) for k, v in metrics.items()})

    def protocol(self) -> dict:
        return {PERSONALIZE: self.reply}
