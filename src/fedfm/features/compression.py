"""Update compression (``compression.up``): what a client sends is the compressed message, counted byte for byte,
with error feedback (each client keeps what compression did not send and adds it to its next update).

The codecs are ``fedfm.compression``; this feature runs them at the client (after every other change to the
update, before DP) and decodes at the server before the update is screened.
"""

from __future__ import annotations

import torch

from fedfm.client import derive_seed
from fedfm.compression import UpdateCodec, with_feedback
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.round.screen import validate
from fedfm.types import ClientUpdate, Weights

PREFIX = "ef."  # the client state's keys: the error-feedback residual


class Compression(Feature):
    name = "compression"
    federated_only = True

    def __init__(self, app):
        c = app.cfg.compression
        self.app, self.cfg = app, c
        self.codec = UpdateCodec(c.up, app.initial_weights, c.topk_fraction, c.block_size)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.compression.active

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        if not c.sends or not c.finite:  # a non-finite update is sent as it is (the server rejects it, saying why)
            return update
        gen = torch.Generator().manual_seed(derive_seed(self.app.cfg.seed, c.task.round, c.index, 0xC0D))
        residual = {k[len(PREFIX):]: v for k, v in c.state.items() if k.startswith(PREFIX)} or None
        message, residual = with_feedback(self.codec, update.delta, residual, gen)
        if self.cfg.error_feedback:
            c.new_state.update({PREFIX + k: v for k, v in residual.items()})
        update.delta = message
        return update

    def decode(self, ctx: RoundContext, update: ClientUpdate, reference: Weights) -> str | None:
        if not UpdateCodec.is_message(update.delta):  # e.g. a client whose update was not finite sends it raw
            return validate(update, reference) or "expected a compressed message (compression.up is set)"
        try:
            update.delta = self.codec.decode(update.delta)
        except ValueError as exc:
            return f"malformed compressed update: {exc}"
        return None
