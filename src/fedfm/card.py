"""The model card saved with every final model (``final/README.md``): the run's facts, and how to load the model.

peft's ``save_pretrained`` writes an empty template there; a user (or a model registry) reading the folder should
learn what the model is: its base, the tuning method, who trained it (owners, rounds, strategy), what privacy it
carries (ε, δ of client- or example-level DP, secure aggregation) or that it carries none, what it scored, and the
lines that load it with its label names. Written here because the card's facts live in fedfm's run summary, which no
library knows about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedfm.models import resolve_model_path
from fedfm.rundir import atomic_write_text

LOADERS = {"classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
           "instruction": "AutoModelForCausalLM", "retrieval": "AutoModel"}


def privacy_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    if "client_dp" in summary:
        dp = summary["client_dp"]
        out.append(f"- client-level differential privacy ({dp['mode']} DP-FedAvg): ε = {dp['epsilon']:.3g}, "
                   f"δ = {dp['delta']:g} over {dp['rounds']} rounds (noise multiplier {dp['noise_multiplier']:g}, "
                   f"{dp['accountant']} accountant)")
    if "example_dp" in summary:
        dp = summary["example_dp"]
        eps = dp.get("epsilon")
        out.append("- example-level differential privacy (DP-SGD): "
                   + (f"ε = {eps:.3g}, " if isinstance(eps, (int, float)) else "")
                   + f"δ = {dp['delta']:g} (noise multiplier {dp['noise_multiplier']:g})")
    if "secure_aggregation" in summary:
        out.append(f"- secure aggregation ({summary['secure_aggregation']['graph']}): the server saw only the sum "
                   "of the updates")
    return out or ["- none: no differential-privacy guarantee; the server saw each owner's update"]


def load_snippet(cfg, base: str, peft: bool, labels: list[str] | None) -> str:
    cls = LOADERS[cfg.task]
    if peft and base == "scratch":
        return (f"The adapter sits on a Llama initialised from seed {cfg.seed} that was never saved (pre-training from "
                "scratch usually trains every weight: peft.method=none). fedfm rebuilds it: `fedfm eval RUN_DIR`.")
    lines = ["```python", f"from transformers import {cls}" + (", AutoConfig" if labels and peft else "")]
    if peft:
        lines += ["from peft import PeftModel", ""]
        if labels:  # the new head's labels live in the base config saved beside the adapter
            lines += ['config = AutoConfig.from_pretrained("final/base_config")',
                      f'base = {cls}.from_pretrained("{base}", config=config)']
        else:
            lines += [f'base = {cls}.from_pretrained("{base}")']
        lines += ['model = PeftModel.from_pretrained(base, "final")  # this folder']
    else:
        lines += ["", f'model = {cls}.from_pretrained("final")  # this folder']
    if labels:
        lines += [f"# labels: {dict(enumerate(labels))}"]
    return "\n".join(lines + ["```"])


def head_lines(cfg, method: str) -> list[str]:
    """The label-skew methods and personalization a federated run used."""
    if method != "federated":
        return []
    h, p, out = cfg.head, cfg.personal, []
    if h.loss != "ce" or h.calibrate != "none":
        out.append(f"- classification head: loss {h.loss}" + (", re-calibrated by CCVR after the last round"
                                                               if h.calibrate == "ccvr" else ""))
    if p.active:
        out.append(f"- personal models ({p.method}): one per owner, saved on the owner's side under `personal/<owner>/`")
    return out


def write_model_card(path: Path, app, method: str, group: str, summary: dict[str, Any]) -> None:
    """``path/README.md`` for the final model of ``group`` in a run of ``method``."""
    cfg = app.cfg
    peft = cfg.peft.method != "none"
    labels = list(app.dataset.label_names) if cfg.task == "classification" else None
    owners = list(app.split.client_names)
    base = str(resolve_model_path(cfg.model.source).resolve()) if cfg.model.source != "scratch" else "scratch"
    metrics = {k: v for k, v in summary.get("global", {}).items() if isinstance(v, (int, float))}
    lines = [
        f"# {cfg.name}: {cfg.task} model trained with fedfm ({method})", "",
        f"- base model: `{cfg.model.source}`" + (f" ({base})" if base != cfg.model.source else "")
        + (" (a new Llama built from model.arch: the weights are all in this folder)" if base == "scratch" else "")
        + (f", quantized {cfg.model.quantization} while training" if cfg.model.quantization else ""),
        f"- tuning: {'full fine-tuning' if not peft else cfg.peft.method}"
        + (f" {json.dumps(cfg.peft.options)}" if cfg.peft.options else "")
        + f"; {app.trainable_params:,} of {app.total_params:,} parameters trained",
        f"- method: {method}" + (f" (this folder: {group})" if method == "local" else "")
        + f", {cfg.rounds} rounds, strategy {cfg.strategy.name}",
        f"- data owners: {len(owners)} ({', '.join(owners[:20])}{', ...' if len(owners) > 20 else ''}), "
        f"data source `{cfg.data.source}`, partition `{cfg.data.partition}`",
        *head_lines(cfg, method),
        "", "## Privacy", "", *privacy_lines(summary),
        *(["- CCVR: each owner sent its label counts and per-class feature means and covariances in the clear"]
          if cfg.head.calibrate == "ccvr" and method == "federated" else []),
        "", "## Held-out metrics (global test split)", "",
        *(f"- {k}: {v:.4g}" for k, v in metrics.items()),
        "", "## Load", "", load_snippet(cfg, base, peft, labels), "",
        "The run directory holds the full record: `config.yaml`, `metrics.jsonl`, `summary.json`, `report.html`.", "",
    ]
    atomic_write_text(Path(path) / "README.md", "\n".join(lines))
