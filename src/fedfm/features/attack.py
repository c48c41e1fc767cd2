"""Simulated Byzantine clients (``attack``), so that defences are measured rather than assumed.

A seeded, fixed set of clients attacks. Data attacks (label flipping, a backdoor trigger) poison their training
shards once, when the App is built; update attacks (sign flip, scaling, noise) and boosting replace what they send.
The round record counts the attackers sampled, and a backdoor's success on the global test set is measured at
every evaluation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedfm import attacks
from fedfm.client import derive_seed
from fedfm.errors import ConfigError
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.tasks.classification import encode
from fedfm.types import ClientUpdate, Weights


class Attack(Feature):
    name = "attack"

    def __init__(self, app):
        self.app, self.a = app, app.cfg.attack
        before = app.feature(Attack)
        if before is not None:  # the App's config changed: its shards were poisoned once, when it was built
            self.byzantine, self.backdoor_test = before.byzantine, before.backdoor_test
            return
        n = len(app.split.client_names)
        self.byzantine: frozenset[int] = attacks.byzantine_clients(n, self.a.fraction, app.cfg.seed)
        self.backdoor_test = None
        if self.a.kind == "label_flip":
            for i in self.byzantine:
                tr = app.shards[i].train
                app.shards[i].train = replace(tr, labels=attacks.flip_labels(tr.labels, app.task.num_labels))
        elif self.a.kind == "backdoor":
            self._plant_backdoor()

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.attack.active

    def _plant_backdoor(self) -> None:
        """Poison the attackers' shards with the trigger; build the triggered test set the attack is judged on."""
        app, a = self.app, self.a
        names = app.dataset.label_names
        if a.target_label is not None and a.target_label not in names:
            raise ConfigError(f"attack.target_label={a.target_label!r} is not a class; choose one of {', '.join(names)}")
        target = names.index(a.target_label) if a.target_label is not None else 0
        texts, labels, max_length = app.dataset.texts, np.asarray(app.dataset.labels), app.cfg.data.max_length
        for i in sorted(self.byzantine):
            rows = list(app.split.client_train[i])
            t, y, _ = attacks.poison_backdoor(
                [texts[j] for j in rows], [int(labels[j]) for j in rows], a.trigger, target, a.poison_fraction,
                derive_seed(app.cfg.seed, i, 0xB4D),
            )
            app.shards[i].train = encode(app.tokenizer, t, np.asarray(y), max_length)
        # the attack's success: triggered global-test examples of other classes, labelled with the target
        rows = [j for j in app.split.global_test if int(labels[j]) != target]
        t, y, _ = attacks.poison_backdoor([texts[j] for j in rows], [int(labels[j]) for j in rows], a.trigger, target,
                                          1.0, 0)
        self.backdoor_test = encode(app.tokenizer, t, np.asarray(y), max_length)

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        if not c.sends or c.index not in self.byzantine:
            return update
        a = self.a
        if a.kind in attacks.UPDATE_ATTACKS:
            gen = torch.Generator().manual_seed(derive_seed(self.app.cfg.seed, c.task.round, c.index, 0xA77))
            scale = a.scale if a.scale is not None else attacks.default_scale(a.kind)
            return replace(update, delta=attacks.poison_update(update.delta, a.kind, scale, a.noise_std, gen))
        if a.kind in attacks.DATA_ATTACKS and a.scale is not None:
            # boosting (Bagdasaryan et al. 2020's model replacement): the poisoned update, scaled up
            return replace(update, delta={k: a.scale * v for k, v in update.delta.items()})
        return update

    def evaluated(self, weights: Weights, metrics: dict[str, float]) -> None:
        if self.backdoor_test is not None:  # share of triggered other-class test texts classified as the target
            app = self.app
            metrics["backdoor_success"] = app.task.evaluate(app.model, self.backdoor_test, app.cfg.eval.batch_size)["accuracy"]

    def after_round(self, ctx: RoundContext, states, groups) -> None:
        if ctx.federated and self.byzantine:
            ctx.record["byzantine_sampled"] = sum(1 for i in ctx.sampled if i in self.byzantine)
