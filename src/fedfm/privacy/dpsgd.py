"""Example-level DP inside local training: DP-SGD with Opacus, on whatever tensors are trainable (peft adapters).

Opacus computes per-example gradients with hooks on the trainable modules (LoRA's ``lora_A``/``lora_B``
Linear layers, a classification head, a prompt embedding), clips each to ``max_grad_norm``, sums, adds
N(0, (noise_multiplier * max_grad_norm)^2) and divides by the *expected* batch size. fedfm wraps the
shared model for the length of one client round and removes the hooks afterwards, so the same base
model serves DP and non-DP participants.

Known pitfalls handled here: frozen base weights must not get hooks (Opacus only hooks modules with
trainable parameters, which is why the check below asks for them); a loss term that is not a sum over
examples (FedProx's proximal term) would bypass per-example clipping, so config validation refuses
DP-SGD with FedProx; Poisson sampling can draw an empty batch, whose step must still release pure noise
(skipping it would reveal that the batch was empty).
"""

from __future__ import annotations

import warnings

import torch

from fedfm.errors import ConfigError


class DPSGD:
    """One client round of DP-SGD: wraps an optimiser and hooks the model; ``close()`` restores both."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, batch_size: int, seed: int):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Opacus's hooks on a model whose inputs need no gradient (frozen embeddings) make torch warn at every
        # backward pass; the per-example gradients are still right (tests/test_dpsgd.py checks them)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            # strict=False: frozen modules with buffers (position ids) are never hooked, so they are harmless
            self.gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
        except NotImplementedError as exc:
            raise ConfigError(f"dpsgd: Opacus cannot compute per-example gradients for this model: {exc}") from None
        self.expected_batch = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=self.generator,
        )
        self.std = cfg.noise_multiplier * cfg.max_grad_norm

    def noise_step(self) -> None:
        """The step of an empty Poisson batch: the gradient is pure noise / expected batch size."""
        for p in self.optimizer.params:
            p.grad = torch.randn(p.shape, generator=self.generator) * self.std / self.expected_batch
        self.optimizer.original_optimizer.step()
        self.optimizer.original_optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove Opacus's hooks and per-example buffers from the shared model."""
        for p in self.optimizer.params:
            p.grad_sample = None
            p.summed_grad = None
        self.gsm._close()


def poisson_batches(n: int, steps: int, q: float, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` batches, each holding every example independently with probability ``q`` (seeded)."""
    return [torch.nonzero(torch.rand(n, generator=generator) < q).flatten() for _ in range(steps)]
