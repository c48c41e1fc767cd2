"""The classification head under label skew: where it is, what feeds it, and the losses and server steps of the
methods for owners that hold one or a few classes (FedRS, FedAwS, FedETF, CCVR).

Written by hand: none of the field's libraries (peft, Flower, transformers) implements these methods. Every function
here is pure tensor arithmetic on small inputs, so the tests check them against numbers worked by hand.

The head is the last ``nn.Linear`` of a ``*ForSequenceClassification`` model (``classifier`` in BERT-style encoders,
``score`` in decoder models); under peft it is the trained copy in ``modules_to_save``. Its input, the pooled
feature ``h``, is read with a forward pre-hook, so the methods work on any such model without touching its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedfm.errors import ConfigError

HEAD_NAMES = ("classifier", "score")


@dataclass
class Head:
    """The classification head of a model: the module called on the features, and its ``nn.Linear``."""

    module: torch.nn.Module  # what the model calls (peft's ModulesToSaveWrapper, or the Linear itself)
    linear: torch.nn.Linear  # the trained copy
    weight_name: str  # the weight's name among the model's trainable tensors ('' when frozen)
    bias_name: str

    def features_and_logits(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, logits) of one forward pass: ``h`` is the head's input (the pooled feature, after dropout)."""
        seen: list[torch.Tensor] = []
        handle = self.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            handle.remove()
        return seen[-1].float(), logits.float()


def head_of(model: torch.nn.Module) -> Head:
    """The classification head of ``model``; ConfigError when it has no single linear head."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in HEAD_NAMES:
            continue
        linear = module
        if hasattr(module, "modules_to_save"):  # peft: the trained copy of the head
            linear = module.modules_to_save[module.active_adapters[0]]
        if not isinstance(linear, torch.nn.Linear):
            raise ConfigError(f"the classification head {name} is a {type(linear).__name__}, not one linear layer: "
                              "head.loss and head.calibrate need a linear head")
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        bias = linear.bias
        return Head(module, linear, names.get(id(linear.weight), ""), names.get(id(bias), "") if bias is not None else "")
    raise ConfigError("head.loss and head.calibrate need a sequence classifier with a 'classifier' or 'score' head")


def label_skew_hint(labels: list[torch.Tensor], num_classes: int) -> str | None:
    """A warning when the owners' labels are so skewed that plain FedAvg learns little (simulation knows every
    shard; nothing is asked of owners): on average at least 75% of an owner's examples in its largest class."""
    shares = [float(torch.bincount(y, minlength=num_classes).max()) / len(y) for y in labels if len(y)]
    if not shares or num_classes < 2 or sum(shares) / len(shares) < 0.75:
        return None
    return (f"owners hold mostly one class each ({100 * sum(shares) / len(shares):.0f}% of an owner's examples are "
            "in its largest class, on average): plain FedAvg learns little here. `recipe: label_skew` applies what "
            "benchmarks/label_skew.py found to work (README: Owners that hold one or a few classes)")


# --- FedRS: restricted softmax (Li & Zhan, KDD 2021) ------------------------------------------------------------
def restricted_logits(logits: torch.Tensor, bias: torch.Tensor | None, present: torch.Tensor, alpha: float) -> torch.Tensor:
    """FedRS's logits: a class the client does not hold scores alpha * w_c.h (+ b_c), so its weight vector is pushed
    away from the client's features alpha times less hard. ``present``: bool [C]."""
    b = bias if bias is not None else torch.zeros(logits.shape[-1], device=logits.device)
    scale = torch.where(present, torch.ones_like(b), torch.full_like(b, alpha))
    return (logits - b) * scale + b


# --- FedETF: a fixed simplex equiangular tight frame head (Li et al., ICCV 2023) ------------------------------
def simplex_etf(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """[C, dim] unit class vectors with pairwise cosine -1/(C-1): sqrt(C/(C-1)) U (I - 11^T/C), U a seeded random
    dim x C matrix with orthonormal columns (needs dim >= C)."""
    if dim < num_classes:
        raise ConfigError(f"head.loss=fedetf needs a feature size >= the number of classes ({dim} < {num_classes})")
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=g, dtype=torch.float64))
    c = num_classes
    m = math.sqrt(c / (c - 1)) * u @ (torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64))
    return m.T.float().contiguous()


def etf_loss(h: torch.Tensor, etf: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of scale * cos(h, m_c): normalised features against the fixed ETF (unit rows)."""
    return F.cross_entropy(scale * F.normalize(h, dim=-1) @ etf.T.to(h), labels)


# --- FedAwS: federated averaging with spreadout (Yu et al., ICML 2020) ----------------------------------------
def positive_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """The client's positives-only loss: mean of max(0, margin - cos(h, w_y))^2 (no other class's vector is used)."""
    cos = (F.normalize(h, dim=-1) * F.normalize(weight[labels].to(h), dim=-1)).sum(-1)
    return F.relu(margin - cos).pow(2).mean()


def spreadout(weight: torch.Tensor, margin: float) -> torch.Tensor:
    """The server's spreadout regulariser: sum over ordered pairs c != c' of max(0, margin - |w_c - w_c'|)^2, on unit
    rows (the positive loss compares directions)."""
    w = F.normalize(weight, dim=-1)
    d = torch.cdist(w, w)
    off = ~torch.eye(len(w), dtype=torch.bool, device=w.device)
    return F.relu(margin - d[off]).pow(2).sum()


def spread_out(weight: torch.Tensor, margin: float, steps: int, lr: float) -> torch.Tensor:
    """The head's weight after ``steps`` gradient steps of size ``lr`` on :func:`spreadout`, rows made unit length (so
    the model's own argmax of w_c.h + b is the argmax of cos(h, w_c) when b is constant)."""
    w = F.normalize(weight.detach().double(), dim=-1).requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(spreadout(w, margin), w)
        with torch.no_grad():
            w -= lr * grad
    return F.normalize(w.detach(), dim=-1).to(weight.dtype)


# --- CCVR: classifier calibration with virtual representations (Luo et al., NeurIPS 2021) ---------------------
@dataclass
class ClassStats:
    """One owner's per-class feature statistics: what CCVR asks of it (and what it reveals)."""

    counts: torch.Tensor  # [C]
    means: torch.Tensor  # [C, d]
    covs: torch.Tensor  # [C, d, d], unbiased (zero for a class with fewer than two examples)


def class_stats(h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassStats:
    """Counts, means and unbiased covariances of the features of each class."""
    h = h.double()
    d = h.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).double()
    means, covs = torch.zeros(num_classes, d, dtype=h.dtype), torch.zeros(num_classes, d, d, dtype=h.dtype)
    for c in range(num_classes):
        x = h[labels == c]
        if len(x):
            means[c] = x.mean(0)
        if len(x) > 1:
            covs[c] = torch.cov(x.T).reshape(d, d)
    return ClassStats(counts, means, covs)


def pool_stats(parts: list[ClassStats]) -> ClassStats:
    """The federation's per-class mean and covariance from the owners' (CCVR's eq. 3-4): the total scatter is the
    owners' within scatter plus their means' scatter around the pooled mean, so the result equals the statistics of
    the pooled features."""
    n = torch.stack([p.counts for p in parts])  # [K, C]
    total = n.sum(0)  # [C]
    mean = torch.einsum("kc,kcd->cd", n, torch.stack([p.means for p in parts])) / total.clamp(min=1)[:, None]
    scatter = torch.zeros_like(parts[0].covs)
    for p, nk in zip(parts, n):
        scatter += (nk - 1).clamp(min=0)[:, None, None] * p.covs
        scatter += nk[:, None, None] * torch.einsum("cd,ce->cde", p.means, p.means)
    scatter -= total[:, None, None] * torch.einsum("cd,ce->cde", mean, mean)
    return ClassStats(total, mean, scatter / (total - 1).clamp(min=1)[:, None, None])


def calibrate(weight: torch.Tensor, bias: torch.Tensor | None, stats: ClassStats, samples: int, steps: int, lr: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head retrained on ``samples`` virtual features per class drawn from N(mean_c, cov_c) (classes nobody holds
    are left out), by full-batch Adam on cross-entropy from the current head."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in torch.nonzero(stats.counts > 1).flatten().tolist():
        cov = stats.covs[c] + 1e-5 * torch.eye(len(stats.means[c]), dtype=stats.covs.dtype)  # positive definite
        chol = torch.linalg.cholesky(cov)
        z = torch.randn(samples, len(stats.means[c]), generator=g, dtype=cov.dtype)
        xs.append(stats.means[c] + z @ chol.T)
        ys.append(torch.full((samples,), c, dtype=torch.long))
    if not xs:
        return weight, bias
    x, y = torch.cat(xs).float(), torch.cat(ys)
    w = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True) if bias is not None else None
    opt = torch.optim.Adam([w] + ([b] if b is not None else []), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = x @ w.T + (b if b is not None else 0)
        F.cross_entropy(logits, y).backward()
        opt.step()
    return w.detach(), (b.detach() if b is not None else None)
