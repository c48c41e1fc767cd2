"""The one local training loop, used by every method (federated, centralized, local) and every engine.

A client copies the server's trainable tensors into its model, takes AdamW steps on its own shard,
and returns the *change* of those tensors. Everything random in a client's round (shuffling,
dropout) is seeded from (run seed, round, client), so results do not depend on the order in which
an engine runs clients, and a resumed run repeats the original exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedfm.config import TrainConfig
from fedfm.errors import TrainingError
from fedfm.models import set_weights, trainable_params
from fedfm.placement import placement_of
from fedfm.types import ClientTask, ClientUpdate, Weights


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; SeedSequence mixes them so nearby inputs give unrelated seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def examples_per_round(n_train: int, cfg: TrainConfig) -> int:
    """Training examples a client processes in one round (local_steps wins over local_epochs)."""
    if cfg.local_steps is not None:
        return cfg.local_steps * cfg.batch_size
    # round() first: 0.14 * 50 is 7.000000000000001 in floating point, which must not become 8
    return max(1, math.ceil(round((cfg.local_epochs or 1.0) * n_train, 6)))


def lr_at(progress: float, cfg: TrainConfig) -> float:
    """Learning rate at ``progress`` in [0, 1] of the whole run.

    A pure function of run progress rather than a torch scheduler object, because each client builds a
    fresh optimiser every round: this is how the schedule continues across rounds (and across methods
    that take different numbers of steps per round).
    """
    if cfg.warmup_fraction > 0 and progress < cfg.warmup_fraction:
        return cfg.lr * progress / cfg.warmup_fraction
    rest = (progress - cfg.warmup_fraction) / max(1e-12, 1 - cfg.warmup_fraction)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1 - rest)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))
    return cfg.lr


def batch_order(n: int, budget: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches covering ``budget`` examples: seeded permutations of the shard, concatenated."""
    reps = math.ceil(budget / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:budget]
    return list(order.split(batch_size))


def train(
    model: torch.nn.Module,
    data,
    task,
    ctask: ClientTask,
    cfg: TrainConfig,
    rounds: int,
    seed: int,
    client_index: int,
    client_name: str,
    loss=None,
    dpsgd=None,
    control: tuple[dict, dict] | None = None,
    optimizer_state: Weights | None = None,
    noise_seed: int | None = None,
) -> ClientUpdate:
    """Run one round of local training and return the update of the trainable tensors.

    ``control`` = (c, c_i), SCAFFOLD's server and client control variates (Karimireddy et al. 2020): every step
    descends along g - c_i + c, and the update's ``control`` holds the mean raw gradient of the round, the client's
    next c_i (the paper's option II, c_i+ = c_i - c + (x - y) / (K lr), reduces to exactly this under plain SGD; the
    mean gradient keeps that meaning under AdamW and a schedule).

    ``optimizer_state`` (train.keep_optimizer_state): the AdamW state this client saved at the end of its last
    round ({} = none yet); the update's ``optimizer`` holds the state to keep for the next one.
    ``noise_seed``: DP-SGD's noise seed, derived from the client's own secret (None: from the public run seed).
    ``loss``: (model, batch) -> the loss to train on instead of the task's (a feature's: logit adjustment, FedRS...).
    """
    n = len(data)
    if n == 0:
        raise TrainingError(f"client {client_name} has no training examples")
    set_weights(model, ctask.weights)
    params = trainable_params(model)
    budget = ctask.num_examples or examples_per_round(n, cfg)
    s = derive_seed(seed, ctask.round, client_index)
    torch.manual_seed(s)  # dropout
    batch_size = ctask.config.get("batch_size") or cfg.batch_size
    batches = batch_order(n, budget, batch_size, torch.Generator().manual_seed(s))

    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    adam = opt  # DP-SGD wraps it below; the moments live in AdamW itself
    if optimizer_state:
        load_adamw_state(adam, params, optimizer_state)
    private = None
    if dpsgd is not None and dpsgd.enabled:  # example-level DP-SGD (Opacus): per-example clipping and noise
        from fedfm.privacy.dpsgd import DPSGD, poisson_batches

        if dpsgd.poisson:  # same number of steps, each a Poisson sample of the shard, as the accountant assumes
            batches = poisson_batches(n, len(batches), min(1.0, batch_size / n), torch.Generator().manual_seed(s + 1))
        # DP-SGD's noise: from the client's secret (``noise_seed``), or from the public run seed if dpsgd.seeded_noise
        private = DPSGD(model, opt, dpsgd, batch_size, noise_seed if noise_seed is not None else s + 2)
        opt = private.optimizer
    try:
        loss_sum, lr, grad_mean = _steps(
            model, data, task, ctask, cfg, rounds, client_name, loss, params, opt, batches, private, control
        )
    finally:
        if private is not None:
            private.close()
    # the change leaves the device once, as float32 on the CPU; measured from the start as the parameters held it
    # (rounded to their dtype), so a lower-precision client adds only what it trained to the server's float32 weights
    delta = {name: p.detach().float().cpu() - _as_held(ctask.weights[name], p) for name, p in params.items()}
    metrics = {"train_loss": float(loss_sum) / len(batches), "steps": len(batches), "examples_seen": budget, "lr": lr}
    if private is not None:
        metrics["dpsgd_q"] = min(1.0, batch_size / n)
    kept = adamw_state(adam, params) if optimizer_state is not None else None
    return ClientUpdate(client=client_name, delta=delta, num_examples=n, metrics=metrics, control=grad_mean, optimizer=kept)


def _as_held(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``w`` (float32, CPU) as the parameter ``p`` holds it once copied in: rounded to ``p``'s dtype."""
    return w if p.dtype == torch.float32 else w.to(p.dtype).float()


def adamw_state(opt: torch.optim.AdamW, params: dict[str, torch.Tensor]) -> Weights:
    """AdamW's per-tensor state as flat named tensors (``m.``, ``v.`` and ``step.`` + tensor name), to save with the
    client's private state; tensors that took no step have none. Written by hand because torch's ``state_dict()``
    keys the state by parameter position in nested dicts, while the client's state store holds flat named tensors
    (safetensors) that must survive a change in which tensors train."""
    out: Weights = {}
    for name, p in params.items():
        st = opt.state.get(p)
        if st:
            out[f"m.{name}"], out[f"v.{name}"] = st["exp_avg"].detach().cpu().clone(), st["exp_avg_sq"].detach().cpu().clone()
            out[f"step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    return out


def load_adamw_state(opt: torch.optim.AdamW, params: dict[str, torch.Tensor], state: Weights) -> None:
    """Give a fresh AdamW the moments and step counts of :func:`adamw_state` (a tensor whose shape changed starts
    afresh)."""
    for name, p in params.items():
        m, v, step = state.get(f"m.{name}"), state.get(f"v.{name}"), state.get(f"step.{name}")
        if m is None or v is None or step is None or m.shape != p.shape or v.shape != p.shape:
            continue
        opt.state[p] = {"step": torch.tensor(float(step.item())), "exp_avg": m.to(p.device, p.dtype, copy=True),
                        "exp_avg_sq": v.to(p.device, p.dtype, copy=True)}


def _steps(model, data, task, ctask, cfg, rounds, client_name, loss_fn, params, opt, batches, private, control=None):
    """The optimiser steps of one round; returns the summed loss, the last learning rate and (SCAFFOLD) the mean
    gradient."""
    model.train()
    where = placement_of(model)
    scaler = where.scaler()  # fp16 on CUDA only
    loss_sum, lr = torch.zeros((), device=where.device), cfg.lr
    correction = grad_sum = None
    if control is not None:  # SCAFFOLD: g <- g + (c - c_i); the raw gradients are averaged for the next c_i
        c, c_i = control
        correction = {k: (c[k] - c_i[k]).to(p.device, p.dtype) for k, p in params.items()}
        grad_sum = {k: torch.zeros_like(p) for k, p in params.items()}
    penalty = _penalty(ctask, params)
    for k, idx in enumerate(batches):
        lr = lr_at((ctask.round - 1 + k / len(batches)) / rounds, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        if len(idx) == 0:  # an empty Poisson batch (DP-SGD only): the step still releases pure noise
            private.noise_step()
            continue
        loss = _backward(model, data, task, idx, cfg, where, scaler, loss_fn, penalty, f"client {client_name}, "
                         f"round {ctask.round}, local step {k}")
        if scaler is not None:
            scaler.unscale_(opt)  # clip and correct true gradients
        if cfg.max_grad_norm is not None and private is None:  # DP-SGD clips per example instead
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        if correction is not None:
            for k, p in params.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad_sum[k] += p.grad
                p.grad.add_(correction[k])
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss
    grad_mean = {k: (g / max(1, len(batches))).float().cpu() for k, g in grad_sum.items()} if grad_sum is not None else None
    return loss_sum.cpu(), lr, grad_mean


def _penalty(ctask, params):
    """A function adding to a step's loss, once per step, the terms that depend on the parameters alone: FedProx's
    mu/2 * ||w - w_global||^2 keeps the client near the global model; continual learning's c/2 * sum F (w - w_anchor)^2
    (EWC / L2-SP) keeps what earlier stages learned. None when neither applies. Their references are copied to the
    parameters' device once per round."""
    pen = ctask.config.get("penalty")  # a fedfm.types.Penalty, or None
    if ctask.prox_mu <= 0 and pen is None:
        return None
    on = {name: p.device for name, p in params.items()}
    start = {n: ctask.weights[n].to(on[n]) for n in params} if ctask.prox_mu > 0 else None
    anchor = {n: pen.anchor[n].to(on[n]) for n in params} if pen is not None else None
    precision = {n: pen.precision[n].to(on[n]) for n in params} if pen is not None and pen.precision is not None else None

    def add(loss: torch.Tensor) -> torch.Tensor:
        if start is not None:
            loss = loss + 0.5 * ctask.prox_mu * sum((p - start[n]).pow(2).sum() for n, p in params.items())
        if anchor is not None:
            sq = {n: (p - anchor[n]).pow(2) for n, p in params.items()}
            quad = sum((sq[n] if precision is None else precision[n] * sq[n]).sum() for n in sq)
            loss = loss + 0.5 * pen.coefficient * quad
        return loss

    return add


def _backward(model, data, task, idx, cfg, where, scaler, loss_fn, penalty, at: str) -> torch.Tensor:
    """Gradients of one batch's loss, accumulated over micro-batches of ``train.micro_batch_size`` examples.

    Each micro-batch's mean loss is weighted by its share of the batch's loss terms (examples, or predicted tokens
    for language models: ``task.loss_terms``), so the accumulated gradient is the full batch's mean-loss gradient
    up to float rounding. A micro-batch with no loss terms (every response cut off) adds nothing and is skipped. The
    penalty joins the first micro-batch computed, once. Returns the batch's loss (detached)."""
    size = cfg.micro_batch_size or len(idx)
    parts = list(idx.split(size)) if size < len(idx) else [idx]
    batches = [task.batch(data, part) for part in parts]
    terms = [task.loss_terms(b) for b in batches] if len(parts) > 1 else [1]
    total = sum(terms) or 1  # all zero: each part's loss is NaN, as the full batch's would be, and the check says so
    out = torch.zeros((), device=where.device)
    for j, batch in enumerate(batches):
        if terms[j] == 0 and sum(terms) > 0:
            continue
        batch = where.move(batch)
        with where.autocast():
            loss = (loss_fn or task.loss)(model, batch)
        loss = loss.float() * (terms[j] / total) if len(parts) > 1 else loss.float()
        if penalty is not None:
            loss, penalty = penalty(loss), None
        if not torch.isfinite(loss):
            raise TrainingError(f"{at}: loss is {loss.detach().item()}; lower train.lr or enable train.max_grad_norm")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        out += loss.detach()
    return out
