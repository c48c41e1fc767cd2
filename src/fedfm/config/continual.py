"""Federated continual learning: a schedule of stages in which the owners' data and the owners change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class StageConfig(Section):
    """One stage of a continual-learning schedule: its rounds, its data, its owners."""

    rounds: int = Field(..., ge=1, description="Rounds of this stage.")
    labels: list[str] | None = Field(
        None, min_length=1, description="Class names trained and tested in this stage (class-incremental)."
    )
    keys: list[str] | None = Field(
        None, min_length=1, description="Natural keys (e.g. tweet topics) trained and tested in this stage (domain-incremental)."
    )
    clients: list[int | str] | None = Field(
        None, min_length=1, description="Owners (names or indices) taking part in this stage (None: every owner)."
    )

    @field_validator("labels", "keys", "clients")
    @classmethod
    def _unique(cls, v):
        if v is not None and len(set(map(str, v))) != len(v):
            raise ValueError("names must be unique")
        return v


class ContinualConfig(Section):
    """Federated continual learning: a schedule of stages in which the owners' data and the owners change."""

    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Stages in order, e.g. [{rounds: 3, labels: [business, entertainment]}, {rounds: 3, labels: "
        "[politics], clients: [0, 1, 2]}]; every stage gives labels, or every stage gives keys ([] = off). "
        "rounds defaults to their sum.",
    )
    method: Literal["naive", "replay", "ewc", "l2sp", "merge"] = Field(
        "naive",
        description="'naive': train each stage on its data only; 'replay': each owner also trains on a private "
        "bounded buffer of its earlier examples; 'ewc': clients add penalty/2 * sum F (w - w*)^2, F the federated "
        "diagonal Fisher accumulated over stages, w* the global model at the last stage end; 'l2sp': the same with F = 1; "
        "'merge': an adapter per stage, merged at the server (see merge and stage_start).",
    )
    merge: Literal["mean", "magmax"] = Field(
        "mean",
        description="merge: how the stages' task vectors (each stage's trained tensors minus the initial ones) are "
        "merged into the served model: 'mean' (their average, task arithmetic with weight 1/stages) or 'magmax' (per "
        "entry, the stage's value of largest magnitude; Marczak et al. 2024). Under LoRA the A and B factors are "
        "merged entry by entry, an approximation of merging the products B A.",
    )
    stage_start: Literal["merged", "previous", "fresh"] = Field(
        "merged",
        description="merge: what each new stage's adapter starts from: 'merged' (the merged model, which is also the "
        "global model between stages; under 'mean' stage s's own change then enters with weight 1/s, a running "
        "average of the stage models), 'previous' (the last stage's trained adapter, sequential fine-tuning as in "
        "MagMax) or 'fresh' (the initial adapter: stages trained independently).",
    )
    replay_size: int = Field(32, ge=1, description="replay: examples kept in each owner's buffer (reservoir sampling).")
    penalty: float | None = Field(
        None,
        ge=0,
        description="ewc/l2sp: coefficient of the quadratic penalty, required by both: its scale depends on the model and "
        "the method (a Fisher is small, so ewc needs a far larger value than l2sp; configs/continual_bbc.yaml: 1e4 and 3).",
    )
    fisher_examples: int = Field(
        128, ge=1, description="ewc: examples of its stage data (seeded subset) each owner uses for its Fisher."
    )

    @property
    def active(self) -> bool:
        return bool(self.stages)


def parts(cfg) -> list[Part]:
    """What continual learning does, as far as other parts are concerned."""
    c, out = cfg.continual, []
    if not c.active:
        return out
    out.append(Part("continual.stages", {Cap.STAGE_SUBSETS: "", Cap.STAGE_OWNER_SAMPLING: "", Cap.STAGE_SCHEDULE: "",
                                         Cap.SIMULATED: "stage schedules read the whole dataset"}))
    if c.method == "ewc":
        out.append(Part("continual.method=ewc", {
            Cap.CLEAR_TENSORS: "each owner's Fisher would be sent in the clear",
            Cap.NON_EXAMPLE_GRADIENT: "the penalty is not a sum over examples"}, fix="use l2sp or replay"))
    if c.method == "l2sp":
        out.append(Part("continual.method=l2sp", {Cap.NON_EXAMPLE_GRADIENT: "the penalty is not a sum over examples"},
                        fix="use naive or replay"))
    if c.method == "merge" and c.stage_start == "fresh":
        out.append(Part("continual.stage_start=fresh", {Cap.RESETS_ADAPTER: ""}))
    return out


def check(cfg) -> None:
    """A stage schedule must be complete and consistent."""
    c = cfg.continual
    if not c.active:
        if c.method != "naive":
            raise ValueError(f"continual.method={c.method} needs continual.stages")
        return
    if len(c.stages) < 2:
        raise ValueError("continual.stages needs at least 2 stages (one stage is ordinary training)")
    total = sum(st.rounds for st in c.stages)
    if cfg.rounds != total:
        raise ValueError(
            f"rounds={cfg.rounds} but continual.stages take {total} rounds "
            f"({' + '.join(str(st.rounds) for st in c.stages)}): set rounds to {total} or leave it out"
        )
    kinds = {("labels" if st.labels else "") + ("keys" if st.keys else "") for st in c.stages}
    if len(kinds) != 1 or kinds == {""}:
        raise ValueError(
            "continual.stages: give labels in every stage (class-incremental) or keys in every stage "
            "(domain-incremental), or both in every stage"
        )
    if cfg.task != "classification":
        raise ValueError(f"continual.stages supports task=classification, not {cfg.task}")
    if c.method in ("ewc", "l2sp") and c.penalty is None:
        raise ValueError(
            f"continual.method={c.method} needs continual.penalty (its scale depends on the model and method: "
            "configs/continual_bbc.yaml uses 1e4 for ewc, 3 for l2sp)"
        )
