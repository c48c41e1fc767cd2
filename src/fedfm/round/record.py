"""The record a round leaves in metrics.jsonl: what every round reports, plus what the features added."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfm.features.base import RoundContext


def mean_metrics(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else {}


def round_record(ctx: RoundContext, seconds: float) -> dict[str, Any]:
    """The round's record. A rejected update's loss and example count are not trusted, nor those of a skipped
    round's reporters; the baselines communicate nothing (centralized holds the data, local owners train alone)."""
    m = mean_metrics(ctx.evals)
    refused = {x["client"] for x in ctx.rejected} | ctx.discarded
    trusted = [u for u in ctx.reports if u.client not in refused]
    losses = [u.metrics["train_loss"] for u in trusted if "train_loss" in u.metrics]
    if not losses and ctx.mean_loss is not None:  # secure aggregation: the mean travelled inside the secure sum
        losses = [ctx.mean_loss]
    fed = ctx.federated
    shards = ctx.app.shards
    return {
        "method": ctx.method,
        "round": ctx.round,
        "sampled": len(ctx.sampled),
        "clients": [u.client for u in ctx.reports],
        "train_loss": float(np.mean(losses)) if losses else None,
        "eval_loss": m.get("loss"),
        "accuracy": m.get("accuracy"),
        "macro_f1": m.get("macro_f1"),
        **{k: m.get(k) for k in ctx.app.task.record_metrics},
        **({"backdoor_success": m["backdoor_success"]} if "backdoor_success" in m else {}),
        # a coordinator without a test set: how many owners' own splits (and examples) the evaluation pooled
        **({k: m[k] for k in ("eval_owners", "eval_examples") if k in m}),
        "bytes_down": ctx.downlink.bytes + ctx.bytes_down if fed else 0,
        "bytes_up": sum(u.bytes_up for u in ctx.reports) + ctx.bytes_up if fed else 0,
        "examples": int(sum(u.metrics.get("examples_seen", 0) for u in trusted)),
        "lr": trusted[-1].metrics.get("lr") if trusted else None,
        "rejected": ctx.rejected,
        **({"skipped": True} if ctx.skipped else {}),
        # sampled clients that neither reported nor missed the deadline: they vanished
        **({"dropped": sorted({shards[i].name for i in ctx.sampled} - {shards[i].name for i in ctx.late}
                              - {u.client for u in ctx.reports})} if fed else {}),
        **ctx.record,
        "round_time_s": seconds,
    }
