"""``head.calibrate: ccvr``: classifier calibration with virtual representations (CCVR, Luo et al., NeurIPS 2021).

After the last round the server asks every owner, through the engine (``fedfm.protocol.CLASS_STATS``), for the
per-class count, mean and covariance of its features under the final global model; pools them into the federation's
per-class Gaussians (exactly the pooled features' statistics) and retrains the head on features sampled from them.
The encoder is untouched. What it reveals: each owner's label counts and, per class it holds, the mean and
covariance of its examples' features: for a one-class owner, a summary of its whole data set. So it is refused with
DP and secure aggregation (``CLEAR_TENSORS``), and the README's privacy table lists it.
"""

from __future__ import annotations

import logging

import torch

from fedfm import codec
from fedfm.client import derive_seed
from fedfm.features.base import Feature, RoundContext
from fedfm.heads import ClassStats, calibrate, class_stats, head_of, pool_stats
from fedfm.models import set_weights
from fedfm.protocol import CLASS_STATS
from fedfm.types import ServerState

log = logging.getLogger("fedfm")


class CCVR(Feature):
    name = "head.calibrate=ccvr"
    federated_only = True

    def __init__(self, app):
        self.app, self.head = app, head_of(app.model)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.head.calibrate == "ccvr"

    def step(self, ctx: RoundContext, group, state: ServerState, agg) -> ServerState:
        """At the last round: the owners' class statistics in, the head retrained on virtual features."""
        cfg, w_name, b_name = self.app.cfg, self.head.weight_name, self.head.bias_name
        if ctx.round != cfg.rounds or not w_name:
            return state
        request = codec.encode(state.weights)
        replies, down, up = ctx.engine.call(CLASS_STATS, [(i, request) for i in group.members])
        ctx.bytes_down, ctx.bytes_up = ctx.bytes_down + down, ctx.bytes_up + up
        parts = []
        for i in sorted(replies):  # a fixed order: the pooled sums do not depend on arrival order
            stats = self.parse(replies[i])
            if stats is None:
                log.warning("round %d: rejected class statistics of client %d", ctx.round, i)
                continue
            parts.append(stats)
        if not parts:
            return state
        h = cfg.head
        bias = state.weights.get(b_name) if b_name else None
        w, b = calibrate(state.weights[w_name], bias, pool_stats(parts), h.ccvr_samples, h.ccvr_steps, h.ccvr_lr,
                         derive_seed(cfg.seed, ctx.round, 0xCC))
        ctx.record["ccvr_owners"] = len(parts)
        weights = {**state.weights, w_name: w, **({b_name: b} if b_name else {})}
        return ServerState(state.round, weights, state.opt)

    def parse(self, reply: bytes) -> ClassStats | None:
        """One owner's statistics, or None when malformed (wrong shapes, not finite, negative counts)."""
        c, d = self.app.task.num_labels, self.head.linear.in_features
        try:
            msg = codec.decode(reply)
            stats = ClassStats(msg["counts"].double(), msg["means"].double(), msg["covs"].double())
        except (ValueError, KeyError):
            return None
        shapes = stats.counts.shape == (c,) and stats.means.shape == (c, d) and stats.covs.shape == (c, d, d)
        if not shapes or any(not torch.isfinite(t).all() for t in (stats.counts, stats.means, stats.covs)):
            return None
        return stats if bool((stats.counts >= 0).all()) else None

    def reply(self, index: int, request: bytes) -> bytes:
        """At an owner: the per-class statistics of its training features under the weights in ``request``."""
        app = self.app
        set_weights(app.model, codec.decode(request))
        data, feats = app.shards[index].train, []
        model = app.model
        was = model.training
        model.eval()
        with torch.inference_mode():
            for idx in torch.arange(len(data)).split(app.cfg.eval.batch_size):
                batch = app.placement.move(app.task.batch(data, idx))
                with app.placement.autocast():
                    h, _ = self.head.features_and_logits(model, batch)
                feats.append(h.cpu())
        model.train(was)
        s = class_stats(torch.cat(feats), data.labels, app.task.num_labels)
        return codec.encode({"counts": s.counts.float(), "means": s.means.float(), "covs": s.covs.float()})

    def protocol(self) -> dict:
        return {CLASS_STATS: self.reply}
