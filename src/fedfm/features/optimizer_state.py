"""``train.keep_optimizer_state``: each client keeps its AdamW moments and step count between rounds, privately.

DiLoCo's workers keep their inner optimizer state (Douillard et al. 2023); a client that starts a fresh AdamW every
round restarts its moments from zero. The state stays in the client's own state (on its machine under Flower) and
is never sent.
"""

from __future__ import annotations

from fedfm.features.base import ClientRound, Feature
from fedfm.types import ClientUpdate

PREFIX = "adam."  # the client state's keys


class KeepOptimizerState(Feature):
    name = "train.keep_optimizer_state"

    def __init__(self, app):
        pass

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.train.keep_optimizer_state

    def client_before(self, c: ClientRound) -> None:
        c.optimizer_state = {k[len(PREFIX):]: v for k, v in c.state.items() if k.startswith(PREFIX)}

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        if update.optimizer is not None:  # AdamW's moments stay with the client
            c.new_state.update({PREFIX + k: v for k, v in update.optimizer.items()})
            update.optimizer = None
        return update
