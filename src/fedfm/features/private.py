"""DP-FedAvg (``dp``) and secure aggregation (``secagg``): client-level privacy as a wrapper around the mean.

Server: the round's plan (clip norm, noise shares, fixed-point range) rides in every task; the aggregator becomes
``PrivateAggregator`` (``fedfm.privacy.aggregate``: central DP's clipped sum, or the secure sum, then DP's noise
and fixed denominator); its state (the adaptive clip norm, the server's noise secret) is ``dp.`` in
``ServerState.opt``; epsilon is recorded every round and the run stops before a round that would exceed
``dp.target_epsilon``. Client: clip and noise (distributed DP, from the client's own secret), then mask; the
secure-aggregation protocol steps are this feature's client functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedfm.aggregators.base import Aggregator
from fedfm.client import derive_seed
from fedfm.errors import ClientDropout
from fedfm.features.base import ClientRound, Feature, RoundContext
from fedfm.privacy import dp
from fedfm.privacy.aggregate import SECAGG_KEY, PrivateAggregator, PrivateRound, client_vector
from fedfm.privacy.secure_fold import SecureFold
from fedfm.round.groups import expected_sampled
from fedfm.types import ClientUpdate, ServerState, Weights

log = logging.getLogger("fedfm")


class Private(Feature):
    name = "dp / secagg"
    prefixes = ("dp.",)
    federated_only = True

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg
        n = len(app.split.client_names)
        fold = SecureFold if app.cfg.secagg.enabled else None  # under secure aggregation the sum is the protocol's
        self.aggregator = PrivateAggregator(app.cfg, n, expected_sampled(n, app.cfg), app.initial_weights, fold)
        self.sessions: dict[int, Any] = {}  # each client's secure-aggregation state for the current round

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.dp.active or cfg.secagg.enabled

    # --- server side ---------------------------------------------------------------------------
    def init_state(self, weights: Weights) -> Weights:
        return self.aggregator.init_opt()

    def configure(self, ctx: RoundContext, group, state: ServerState, members: list[int]) -> dict[str, Any]:
        return self.aggregator.plan(state.opt, len(members)).to_config()

    def wrap(self, aggregator: Aggregator, method: str) -> Aggregator:
        return self.aggregator  # the mean, over a clipped or a secure sum (other aggregators are refused by config)

    def expected(self, layout: Weights | None) -> Weights | None:
        # under secure aggregation an update is one protocol message: the secure fold and the protocol screen it
        return None if self.cfg.secagg.enabled else layout

    def after_round(self, ctx: RoundContext, states, groups) -> None:
        if self.cfg.dp.active:
            ctx.record["epsilon"] = self.aggregator.epsilon(ctx.round)  # a skipped round is counted too (an upper bound)

    def stop_reason(self, done: int) -> str | None:
        target = self.cfg.dp.target_epsilon
        if target is None:
            return None
        eps = self.aggregator.epsilon(done + 1)
        if eps <= target:
            return None
        return f"privacy budget: round {done + 1} would reach epsilon {eps:.3f} > dp.target_epsilon {target}"

    def summary(self, runner, rounds: int, metrics: list[dict]) -> dict[str, Any]:
        cfg, out = self.cfg, {}
        if cfg.dp.active:
            out["client_dp"] = {
                "mode": cfg.dp.mode, "epsilon": self.aggregator.epsilon(rounds), "delta": cfg.dp.delta,
                "noise_multiplier": cfg.dp.noise_multiplier, "sampling": cfg.federation.sampling,
                "expected_clients": self.aggregator.expected, "rounds": rounds, "accountant": cfg.dp.accountant,
            }
        if cfg.secagg.enabled:
            graph = "complete" if cfg.secagg.neighbours is None else f"{cfg.secagg.neighbours} neighbours"
            out["secure_aggregation"] = {"graph": graph}
        return out

    # --- client side ---------------------------------------------------------------------------
    def client_before(self, c: ClientRound) -> None:
        if "private" in c.task.config and self.cfg.dp.mode == "distributed" and not self.cfg.dp.seeded_noise:
            c.noise_secret()  # this client's share of the noise comes from its own secret, not the run seed

    def client_after(self, c: ClientRound, update: ClientUpdate) -> ClientUpdate:
        """Clip and noise (DP under secure aggregation; the noise from the client's secret unless dp.seeded_noise),
        then mask (secure aggregation)."""
        if "private" not in c.task.config:
            return update
        plan = PrivateRound(**c.task.config["private"])
        delta, bit = update.delta, 0.0
        if plan.clip_norm is not None:
            delta, norm = dp.clip(delta, plan.clip_norm)
            bit = (1.0 if norm <= plan.clip_norm else 0.0) - 0.5  # centred: sensitivity 1/2
        secret = c.noise_secret() if self.cfg.dp.mode == "distributed" and not self.cfg.dp.seeded_noise else None
        r = c.task.round
        seed = derive_seed(*secret, r) if secret is not None else derive_seed(self.cfg.seed, r, c.index, 0xD1)
        gen = torch.Generator().manual_seed(seed)
        if plan.noise_std > 0:
            delta = {k: delta[k] + n for k, n in dp.gaussian_like(delta, plan.noise_std, gen).items()}
        if plan.count_noise_std > 0:
            bit += float(torch.randn((), generator=gen, dtype=torch.float64)) * plan.count_noise_std
        if not plan.secagg:
            return replace(update, delta=delta)
        return self._mask(c, update, delta, plan, bit)

    def _mask(self, c: ClientRound, update: ClientUpdate, delta: Weights, plan: PrivateRound, bit: float) -> ClientUpdate:
        from fedfm.privacy.secagg import encode_fixed

        t0 = time.perf_counter()
        vector = client_vector(delta, plan, update.num_examples, update.metrics["train_loss"], bit)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, c.task.round, c.index, 0x5E))
        masked = self.sessions[c.index].mask(encode_fixed(vector, plan.frac_bits, plan.participants, rng))
        public = {k: update.metrics[k] for k in ("steps", "examples_seen", "lr")}
        public["mask_seconds"] = time.perf_counter() - t0
        # only the masked vector leaves: no example count, no loss (both travel inside the secure sum)
        return ClientUpdate(
            update.client, {SECAGG_KEY: torch.frombuffer(bytearray(masked), dtype=torch.uint8)}, 1.0,
            {**public, "client_index": c.index},
        )

    # --- the secure-aggregation protocol at a client --------------------------------------------
    def protocol(self) -> dict:
        if not self.cfg.secagg.enabled:
            return {}
        return {"secagg_advertise": self.advertise, "secagg_share_keys": self.share_keys,
                "secagg_receive_shares": self.receive_shares, "secagg_unmask": self.unmask}

    def _step(self, index: int, step):
        """Run a client's protocol step; a request the client refuses (malformed, unsafe) makes it go silent, as a
        networked client would, so the server treats it as vanished instead of the whole run failing."""
        from fedfm.privacy.secagg import SecAggError

        try:
            return step()
        except (SecAggError, ValueError, KeyError) as exc:
            log.warning("client %d refused a secure-aggregation step: %s", index, exc)
            raise ClientDropout(str(exc)) from None

    def advertise(self, index: int, setup: bytes) -> bytes:
        """Stage 1: a fresh client state for this round's session; its public keys."""
        from fedfm.privacy.secagg import SecAggClient, SecAggParams

        if len(setup) != 44:
            raise ClientDropout(f"client {index}: secure aggregation setup must be 44 bytes, got {len(setup)}")
        session, length, degree = setup[:32], int.from_bytes(setup[32:40], "little"), int.from_bytes(setup[40:44], "little")
        sa = self.cfg.secagg
        params = SecAggParams(sa.frac_bits, degree or None, sa.threshold, self.cfg.federation.min_clients)
        self.sessions[index] = SecAggClient(index, session, params, length)
        return self._step(index, self.sessions[index].advertise)

    def share_keys(self, index: int, roster: bytes) -> bytes:
        """Stage 2: encrypted shares of this client's secrets for each neighbour."""
        return self._step(index, lambda: self.sessions[index].share_keys(roster))

    def receive_shares(self, index: int, inbox: bytes) -> bytes:
        """Stage 2 (delivery): keep the neighbours' encrypted shares until unmasking."""
        self._step(index, lambda: self.sessions[index].receive_shares(inbox))
        return b""

    def unmask(self, index: int, request: bytes) -> bytes:
        """Stage 4: the shares the server needs to remove masks; the round's client state is then discarded."""
        return self._step(index, lambda: self.sessions.pop(index).unmask(request))
