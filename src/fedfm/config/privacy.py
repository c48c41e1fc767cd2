"""Client-level DP (DP-FedAvg), example-level DP (DP-SGD) and secure aggregation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class DPConfig(Section):
    """Client-level differential privacy (DP-FedAvg): protects any one client's whole participation."""

    mode: Literal["off", "central", "distributed"] = Field(
        "off",
        description="'central': clients clip their updates, the server adds N(0, (z*C)^2) to their sum (it sees individual "
        "clipped updates, the released model is private); 'distributed': each client adds its share of the noise and secure "
        "aggregation hides the individual updates (requires secagg.enabled).",
    )
    noise_multiplier: float = Field(1.0, ge=0, description="z: noise standard deviation / clip norm on the summed update.")
    clip_norm: float = Field(1.0, gt=0, description="C: L2 bound of each client's update (initial value when adaptive).")
    adaptive_clip: bool = Field(False, description="Adapt C toward a quantile of update norms (Andrew et al. 2021).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: target share of unclipped updates.")
    clip_lr: float = Field(0.2, gt=0, description="Adaptive clipping: geometric learning rate of C.")
    clip_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: noise std of the clipped count (None: expected clients / 20)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee reported.")
    target_epsilon: float | None = Field(
        None, gt=0, description="Budget: the run stops cleanly before a round that would exceed this epsilon."
    )
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting accountant: Renyi DP, or privacy loss distributions (Poisson sampling only)."
    )
    seeded_noise: bool = Field(
        False,
        description="Draw the noise from the run's seed, so a seeded run repeats bit for bit. The seed is in config.yaml: "
        "anyone holding it can regenerate the noise and subtract it, so the guarantee does NOT hold (simulations and "
        "tests only). Default: every noise source (the server, each client) seeds its noise from a secret it draws from "
        "the OS once and keeps in its own checkpointed state, so a resumed run still continues bit for bit.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @property
    def active(self) -> bool:
        return self.mode != "off"


class DPSGDConfig(Section):
    """Example-level DP inside local training (DP-SGD with Opacus): protects each training example."""

    enabled: bool = Field(False, description="Train each client with Opacus DP-SGD (per-example clipping and noise).")
    noise_multiplier: float = Field(1.0, ge=0, description="Noise std / max_grad_norm on each summed batch gradient.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient L2 bound (a very large value = off).")
    poisson: bool = Field(
        True, description="Poisson-sample each local batch (rate batch_size / shard size), as DP-SGD's accounting "
        "assumes. false: shuffled fixed-size batches, and no example-level epsilon is reported (none would hold).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the example-level (epsilon, delta) reported.")
    seeded_noise: bool = Field(
        False, description="As dp.seeded_noise: noise from the public run seed (reproducible, but no guarantee)."
    )


class SecAggConfig(Section):
    """Secure aggregation (SecAgg / SecAgg+): the server learns only the sum of the clients' updates."""

    enabled: bool = Field(False, description="Mask updates so the server can unmask only their sum.")
    neighbours: int | Literal["auto"] | None = Field(
        None,
        description="Neighbours per client (SecAgg+ sparse graph); 'auto' = the smallest O(log n) degree that survives "
        "federation.dropout with failure probability <= 2^-20; None = every pair (SecAgg).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Share of a client's neighbours needed to recover its secrets if it drops out."
    )
    frac_bits: int = Field(24, ge=8, le=40, description="Fixed-point fraction bits before masking in the field Z_(2^61-1).")


def parts(cfg) -> list[Part]:
    """What DP-FedAvg, DP-SGD and secure aggregation do, as far as other parts are concerned."""
    dp, out = cfg.dp, []
    if dp.active:
        caps = {Cap.NOISED_SUM: "", Cap.CLIENT_PRIVACY: "", Cap.DP_CLAIM: "", Cap.HIDES_COUNTS: ""}
        if cfg.federation.sampling != "poisson":
            caps[Cap.FIXED_SAMPLING_ACCOUNTING] = ""
        out.append(Part(f"dp.mode={dp.mode}", caps))
    if cfg.dpsgd.enabled:
        out.append(Part("dpsgd", {Cap.PER_EXAMPLE: "", Cap.DP_CLAIM: "", Cap.EXAMPLE_ACCOUNTING: ""}))
    if cfg.secagg.enabled:
        out.append(Part("secagg", {
            Cap.SUM_ONLY: "", Cap.CLIENT_PRIVACY: "",
            Cap.DENSE_UPDATE: "masking needs every client's dense vector of field elements (a sparse or quantised update "
            "would be re-expanded to 8 bytes per coordinate)",
        }, fix="compress or mask, not both"))
    return out


def check(cfg) -> None:
    """What each privacy section needs of the rest of the config."""
    dp, sa = cfg.dp, cfg.secagg
    if dp.mode == "distributed" and not sa.enabled:
        raise ValueError(
            "dp.mode=distributed needs secagg.enabled=true: each client adds only a share of the noise, "
            "so without secure aggregation the server would see barely-noised individual updates"
        )
    if dp.accountant == "pld" and dp.active and cfg.federation.sampling != "poisson":
        raise ValueError("dp.accountant=pld supports federation.sampling=poisson only; use rdp for fixed-size sampling")
    if dp.target_epsilon is not None and not dp.active:
        raise ValueError("dp.target_epsilon needs dp.mode=central or distributed")
    if isinstance(sa.neighbours, int) and sa.neighbours < 2:
        raise ValueError("secagg.neighbours must be at least 2 (or 'auto', or null for the complete graph)")
    if sa.enabled and cfg.federation.min_clients < 2:
        raise ValueError("secagg.enabled needs federation.min_clients >= 2: the 'sum' of one client is its update")
