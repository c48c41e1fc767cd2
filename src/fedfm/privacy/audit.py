"""Privacy audit: membership-inference attacks against a finished run's final model.

Members are examples the federation trained on (drawn from the clients' training shards); non-members
are examples of the global test split, which no participant ever saw. Two attacks score every example,
and each is summarised by ROC AUC and the true-positive rate at 1% false positives (the regime that
matters: confidently exposing a few members, Carlini et al. 2022):

- loss threshold (Yeom et al. 2018): score = -cross-entropy of the true label; no shadow models;
- offline LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"): K shadow
  federations are trained with the target's own config on *population* data (the rest of the corpus,
  disjoint from every audited example), so every shadow is "OUT" for every audited example; an
  example's score is how far the target's logit-scaled confidence phi = log p_y - log(1 - p_y) lies
  above the shadows' mean for that example, in units of the shadows' (global) standard deviation.

Shadows are real fedfm runs (same rounds, clients, partition, DP settings), so the attack models the
training procedure, as the attack assumes. Hand-written: the two score formulas; ROC from scikit-learn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedfm.errors import FedFMError

log = logging.getLogger("fedfm")


@dataclass
class AttackResult:
    attack: str
    auc: float
    tpr_at_1pct_fpr: float

    def row(self) -> dict:
        return {"attack": self.attack, "auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr}


def roc_summary(attack: str, member_scores: np.ndarray, nonmember_scores: np.ndarray) -> AttackResult:
    """ROC AUC and TPR at FPR <= 1% of scores where higher means 'member' (scikit-learn's ROC)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return AttackResult(attack, float(roc_auc_score(y, s)), float(tpr[fpr <= 0.01].max(initial=0.0)))


def label_scores(model: torch.nn.Module, data, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (log p_y, phi = log p_y - log(1 - p_y)) of the true label, computed stably from logits."""
    model.eval()
    logp, phi = [], []
    with torch.inference_mode():
        for idx in torch.arange(len(data)).split(batch_size):
            mask = data.attention_mask[idx]
            width = int(mask.sum(1).max())
            z = model(input_ids=data.input_ids[idx, :width], attention_mask=mask[:, :width]).logits.double()
            y = data.labels[idx]
            zy = z.gather(1, y[:, None]).squeeze(1)
            others = z.scatter(1, y[:, None], float("-inf"))
            logp.append((zy - torch.logsumexp(z, 1)).numpy())
            phi.append((zy - torch.logsumexp(others, 1)).numpy())  # log p_y - log(1 - p_y)
    return np.concatenate(logp), np.concatenate(phi)


def lira_offline(target_phi: np.ndarray, shadow_phi: np.ndarray) -> np.ndarray:
    """Offline LiRA scores: (phi - mean_out) / std_out, one std over all examples (Carlini et al.'s fixed
    variance, better than per-example variances with few shadows). ``shadow_phi``: [K, N]."""
    mu = shadow_phi.mean(0)
    sigma = float(shadow_phi.std(0, ddof=1).mean()) if len(shadow_phi) > 1 else float(shadow_phi.std())
    return (target_phi - mu) / max(sigma, 1e-12)


def _final_weights(run_dir: Path):
    from fedfm.rundir import RunDir

    rd = RunDir(run_dir)
    if rd.status().get("status") != "complete":
        raise FedFMError(f"run {run_dir} is not complete: audit a finished run")
    loaded = rd.load_checkpoint()
    if loaded is None:
        raise FedFMError(f"run {run_dir} has no checkpoint")
    return rd.load_config(), loaded[0][0].weights


def audit_membership(run_dir: Path, shadows: int = 4, per_side: int = 500, seed: int = 0, console=None) -> dict:
    """Run both attacks against ``run_dir``'s final federated model; write ``audit.json`` there."""
    from fedfm import server
    from fedfm.app import App
    from fedfm.models import set_weights

    run_dir = Path(run_dir)
    cfg, weights = _final_weights(run_dir)
    if cfg.task != "classification":
        raise FedFMError("the membership audit supports classification runs")
    app = App(cfg)
    set_weights(app.model, weights)
    rng = np.random.default_rng(seed)
    pool = type(app.shards[0].train).cat([s.train for s in app.client_shards])
    m = min(per_side, len(pool), len(app.global_test))
    members = pool.subset(np.sort(rng.choice(len(pool), m, replace=False)))
    nonmembers = app.global_test.subset(np.sort(rng.choice(len(app.global_test), m, replace=False)))
    audited = type(members).cat([members, nonmembers])
    logp, phi = label_scores(app.model, audited, cfg.eval.batch_size)
    results = [roc_summary("loss threshold", logp[:m], logp[m:])]

    shadow_phi = []
    if shadows:
        population = _population_file(cfg, run_dir, app.dataset.texts)
        for k in range(shadows):
            shadow_dir = run_dir / "audit" / f"shadow-{k}"
            scfg = cfg.model_copy(deep=True)
            scfg.data = scfg.data.model_copy(update={"source": "jsonl", "path": str(population), "key_column": None})
            scfg.seed = cfg.seed + 1000 + k  # a different random subset of the population, split the same way
            scfg.name = f"shadow-{k}"
            if not (shadow_dir / "status.json").exists() or json.loads((shadow_dir / "status.json").read_text()).get("status") != "complete":
                import shutil

                shutil.rmtree(shadow_dir, ignore_errors=True)
                server.run(scfg, "federated", shadow_dir, console)
            _, sw = _final_weights(shadow_dir)
            set_weights(app.model, sw)  # same architecture and label order (sorted label names in both datasets)
            shadow_phi.append(label_scores(app.model, audited, cfg.eval.batch_size)[1])
        scores = lira_offline(phi, np.stack(shadow_phi))
        results.append(roc_summary(f"offline LiRA ({shadows} shadows)", scores[:m], scores[m:]))
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {
        "run_dir": str(run_dir),
        "members": m,
        "nonmembers": m,
        "epsilon": summary.get("client_dp", {}).get("epsilon"),
        "attacks": [r.row() for r in results],
    }
    (run_dir / "audit.json").write_text(json.dumps(out, indent=1))
    return out


def _population_file(cfg, run_dir: Path, texts_of_run: list[str]) -> Path:
    """The corpus minus every example the audited run sampled (train and test), as JSONL for the shadows."""
    from fedfm.data.sources import load_dataset

    full_cfg = cfg.data.model_copy(update={"max_examples": None})
    full = load_dataset(full_cfg, cfg.seed)
    if cfg.data.partition == "natural":
        raise FedFMError("the LiRA audit re-splits population data: it needs a dirichlet, iid or quantity partition")
    if not cfg.data.max_examples or len(full) <= cfg.data.max_examples:
        raise FedFMError("the LiRA audit needs population data: the run must use a subsample (data.max_examples)")
    used = np.sort(np.random.default_rng(cfg.seed).choice(len(full), cfg.data.max_examples, replace=False))
    used_texts = [full.texts[i] for i in used]  # the same draw as fedfm.data.sources.load_dataset
    if used_texts != list(texts_of_run):
        raise FedFMError("cannot reproduce the run's data subsample: was it made by another fedfm version?")
    # corpora hold duplicate texts (BBC News repeats some articles): a copy of an audited text is not population,
    # and the population keeps one copy of each of its own texts
    seen, rest = set(used_texts), []
    for i, text in enumerate(full.texts):
        if text not in seen:
            seen.add(text)
            rest.append(i)
    path = run_dir / "audit" / "population.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in rest:
            f.write(json.dumps({"text": full.texts[i], "label": full.label_names[full.labels[i]]}) + "\n")
    return path
