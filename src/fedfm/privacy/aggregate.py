"""The server side of a private round: secure aggregation and/or DP-FedAvg, wrapped around the mean.

Order of the stages (each declares what the server may see):

  client: train -> [distributed DP: clip to C, add its share of the noise] -> [secagg: fixed-point, mask]
  server: [secagg: unmask the *sum* only] -> [central DP: clip each update, sum, add N(0, (z C)^2)]
          -> divide by the expected number of clients (DP) or by the summed example weights -> server optimizer

Both are folds (``fedfm.aggregators.base``): the clipped sum of central DP is a running sum in client order; the
masked vectors of secure aggregation go to the protocol's server (``SecAggServer``), which keeps them in the
round's spool until their sum can be unmasked. Every mean-based server optimizer then works unchanged; aggregators
that need individual updates are refused by config validation. Under secure aggregation only the masked vector
leaves a client: its training loss travels inside the secure sum (without DP), so the server learns the round's
mean loss, not any client's.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedfm.aggregators.base import Aggregate, FoldContext
from fedfm.aggregators.mean import MeanFold
from fedfm.client import derive_seed
from fedfm.errors import RoundSkipped
from fedfm.privacy import dp
from fedfm.types import ClientUpdate, Weights

log = logging.getLogger("fedfm")

SECAGG_KEY = "secagg"  # the one tensor of a masked update: the protocol message as uint8
TAIL = 2  # coordinates appended to each secure-aggregated vector: [weight, train_loss] (no DP) or [bit, 0] (DP)


def flatten(weights: Weights) -> np.ndarray:
    """All tensors in sorted-name order as one float64 vector (the layout secure aggregation masks)."""
    return np.concatenate([weights[k].detach().double().reshape(-1).numpy() for k in sorted(weights)])


def unflatten(vector: np.ndarray, reference: Weights) -> Weights:
    """Inverse of ``flatten`` against the names and shapes of ``reference``."""
    out, at = {}, 0
    for k in sorted(reference):
        n = reference[k].numel()
        out[k] = torch.from_numpy(np.ascontiguousarray(vector[at : at + n])).float().reshape(reference[k].shape)
        at += n
    return out


def session_id(seed: int, round_: int, members: list[int]) -> bytes:
    """32 bytes binding every secure-aggregation message to this run, round and set of clients."""
    return hashlib.sha256(f"fedfm-secagg|{seed}|{round_}|{sorted(members)}".encode()).digest()


@dataclass
class PrivateRound:
    """What the client side needs to know for one private round (sent inside ClientTask.config)."""

    secagg: bool
    weighted: bool  # weight the update by the client's examples (no DP) or not (DP: each client counts 1)
    clip_norm: float | None  # DP under secure aggregation: clients clip to this norm
    noise_std: float  # distributed DP: each client's share of the update noise
    count_noise_std: float  # distributed DP with adaptive clipping: each client's share of the count noise
    participants: int  # clients asked this round (bounds the fixed-point range)
    frac_bits: int

    def to_config(self) -> dict:
        return {"private": self.__dict__.copy()}


class PrivateAggregator:
    """The mean of a private round: DP-FedAvg's noise and fixed denominator, over a clipped or a secure sum."""

    needs_individual_updates = False
    ordered = True

    def __init__(self, cfg, num_clients: int, expected_clients: float, reference: Weights, fold=None):
        """``fold``: the fold class of a round (``fedfm.privacy.secure_fold.SecureFold`` under secure aggregation;
        default: the server's own clipped sum)."""
        self.cfg, self.dp, self.sa = cfg, cfg.dp, cfg.secagg
        self.fold = fold or ClippedFold
        self.reference = {k: torch.empty(t.shape) for k, t in reference.items()}  # names and shapes only
        self.num_clients = num_clients
        self.expected = expected_clients
        self.length = sum(t.numel() for t in reference.values()) + TAIL
        self.sampling = dp.Sampling(cfg.federation.sampling, num_clients, expected_clients)
        count_std = self.dp.clip_count_stddev or expected_clients / 20  # Andrew et al. 2021's default
        self.count_std = count_std if self.dp.adaptive_clip else None
        self.seen_digests: set[bytes] = set()  # digests of every masked vector received: a replay is refused
        self.z_updates = dp.update_noise_multiplier(self.dp.noise_multiplier, self.count_std) if self.dp.active else 0.0

    # --- accounting -----------------------------------------------------------------------------
    def epsilon(self, rounds: int) -> float:
        return dp.epsilon(rounds, self.sampling, self.dp.noise_multiplier, self.dp.delta, self.dp.accountant)

    def init_opt(self) -> Weights:
        return {dp.CLIP_KEY: torch.tensor(self.dp.clip_norm, dtype=torch.float64)} if self.dp.active else {}

    def clip_norm(self, opt: Weights) -> float:
        return float(opt.get(dp.CLIP_KEY, torch.tensor(self.dp.clip_norm)))

    # --- one round --------------------------------------------------------------------------------
    def plan(self, opt: Weights, participants: int) -> PrivateRound:
        distributed = self.dp.mode == "distributed"
        # under secure aggregation the server cannot clip: clients do (central mode: the server still adds the noise)
        client_clip = self.dp.active and self.sa.enabled
        # each of at least min_clients reporters adds 1/min_clients of the variance: the sum is noised enough
        share = 1.0 / math.sqrt(self.cfg.federation.min_clients)
        c = self.clip_norm(opt)
        return PrivateRound(
            secagg=self.sa.enabled,
            weighted=not self.dp.active,
            clip_norm=c if client_clip else None,
            noise_std=self.z_updates * c * share if distributed else 0.0,
            count_noise_std=(self.count_std or 0.0) * share if distributed else 0.0,
            participants=participants,
            frac_bits=self.sa.frac_bits,
        )

    def start(self, ctx: FoldContext):
        return self.fold(self, ctx)

    def finish(self, ctx: FoldContext, total: Weights, weight: float, bits: float, reporters: int) -> Aggregate:
        """The round's mean from the (clipped or unmasked) sum: DP noise and the fixed denominator, or the mean."""
        opt = ctx.state.opt
        info: dict = {"reporters": reporters}
        new_opt: Weights = {}
        if not self.dp.active:
            return Aggregate({k: t / weight for k, t in total.items()}, weight, reporters, info)
        clip_now = self.clip_norm(opt)
        if self.dp.mode == "central":
            if self.dp.seeded_noise:
                seed = derive_seed(self.cfg.seed, ctx.round, 0xD9)
            else:  # the server's secret, kept in its checkpointed state (under dp.)
                secret, new_opt = dp.noise_secret(opt)
                seed = derive_seed(*secret, ctx.round)
            gen = torch.Generator().manual_seed(seed)
            total = {k: total[k] + n for k, n in dp.gaussian_like(total, self.z_updates * clip_now, gen).items()}
            if self.count_std:
                bits += float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
        mean = {k: t / self.expected for k, t in total.items()}  # fixed denominator (McMahan et al. 2018)
        info.update(epsilon=self.epsilon(ctx.round), clip_norm=clip_now)
        if self.dp.adaptive_clip:
            fraction = bits / self.expected + 0.5  # bits were centred at 1/2 (sensitivity 1/2)
            new_clip = dp.next_clip_norm(clip_now, fraction, self.dp.target_quantile, self.dp.clip_lr)
            new_opt[dp.CLIP_KEY] = torch.tensor(new_clip, dtype=torch.float64)
            info["unclipped_fraction"] = fraction
        return Aggregate(mean, float(reporters), reporters, info, opt=new_opt)


class ClippedFold:
    """Central DP without secure aggregation: the server clips each update itself (it does not trust clients to),
    sums them unweighted in client order, and notes whether each was within the bound (adaptive clipping)."""

    def __init__(self, private: PrivateAggregator, ctx: FoldContext):
        self.private, self.ctx = private, ctx
        self.clip = private.clip_norm(ctx.state.opt)
        self.sum = MeanFold(weighted=False)
        self.bits = 0.0

    @property
    def count(self) -> int:
        return self.sum.count

    def add(self, update: ClientUpdate) -> None:
        delta, norm = dp.clip(update.delta, self.clip)
        self.bits += (1.0 if norm <= self.clip else 0.0) - 0.5
        self.sum.add(ClientUpdate(update.client, delta, 1.0))

    def result(self) -> Aggregate:
        if self.sum.sum is None:
            raise RoundSkipped(f"round {self.ctx.round}: no valid update to aggregate")
        return self.private.finish(self.ctx, self.sum.sum, self.sum.weight, self.bits, self.sum.count)


def client_vector(delta: Weights, plan: PrivateRound, num_examples: float, train_loss: float, bit: float) -> np.ndarray:
    """What a client feeds to secure aggregation: its (weighted) update and the two tail coordinates."""
    w = num_examples if plan.weighted else 1.0
    tail = [bit, 0.0] if not plan.weighted else [w, train_loss]
    return np.concatenate([flatten(delta) * w, np.asarray(tail, dtype=np.float64)])
