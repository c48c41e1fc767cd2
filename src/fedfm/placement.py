"""Where a client's model lives and in what precision it computes: device, storage dtype, autocast, loss scaling.

A ``Placement`` is resolved once per process from the config (``train.device``, ``model.dtype``,
``train.mixed_precision``) and attached to the model it placed, so the training loop and every task's evaluation
move their batches and enter autocast the same way without each taking more arguments. What travels never
depends on it: the server's weights and every update are float32 on the CPU (``fedfm.types.Weights``); a client
copies the weights in (cast to its parameters' dtype and device) and hands back the change as float32 on the CPU,
once per round.

torch does the work (``torch.autocast``, ``torch.amp.GradScaler``); this module only decides which of them apply.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from fedfm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def resolve_device(spec: str) -> torch.device:
    """``train.device`` -> a torch device that exists here, or a ConfigError in one line.

    ``auto`` is CUDA when torch sees a GPU, else the CPU: each process resolves it on its own machine (a Flower
    SuperNode with a GPU trains there while one without trains on its CPU, from the same config)."""
    if not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"train.device={spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (" has no CUDA support" if torch.version.cuda is None else
                                                    " sees no CUDA GPU")
            raise ConfigError(f"train.device={spec}: {build} on this machine; use train.device=cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


@dataclass(frozen=True)
class Placement:
    """A model's device, the dtype of its frozen weights, and the dtype its forward pass computes in."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # storage dtype of the base model's weights (model.dtype)
    compute: torch.dtype | None = None  # autocast dtype of forward passes (None: none)
    scale_loss: bool = False  # fp16 on CUDA: losses go through a GradScaler so small gradients do not underflow

    def move(self, batch):
        """A batch (tensors, or dicts / lists of them) on this device; a no-op on the CPU."""
        if self.device.type == "cpu":
            return batch
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.move(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.move(v) for v in batch)
        return batch

    def autocast(self):
        """The context a forward pass runs in: torch.autocast in ``compute``, or nothing."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A fresh GradScaler for fp16 training on CUDA (one per round: its scale starts over with the optimizer)."""
        return torch.amp.GradScaler(self.device.type) if self.scale_loss else None


def placement(device: str, dtype: str, mixed_precision: str) -> Placement:
    """Resolve the config's device and precision here, refusing in one line what this machine cannot run."""
    dev = resolve_device(device)
    store, compute = DTYPES[dtype], AUTOCAST[mixed_precision]
    if compute is torch.float16 and dev.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA device (train.device={device} is {dev}): "
                          "use bf16 on the CPU")
    if store is torch.float16 and dev.type != "cuda":
        raise ConfigError(f"model.dtype=float16 needs a CUDA device (train.device={device} is {dev}): use "
                          "bfloat16 on the CPU")
    if compute is torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.mixed_precision=bf16: {torch.cuda.get_device_name(dev)} has no bfloat16 support; "
                          "use fp16")
    if compute is None and store is not torch.float32:
        # a low-precision base computes in its own dtype; autocast lets float32 trainable tensors (adapters, a new
        # head) meet its activations, as in mixed-precision training with float32 master weights
        compute = store
    return Placement(dev, store, compute, scale_loss=compute is torch.float16)


def placement_of(model: torch.nn.Module) -> Placement:
    """The placement a model was given (``attach``), or float32 on the CPU."""
    return getattr(model, "fedfm_placement", None) or Placement()


def attach(model: torch.nn.Module, where: Placement) -> torch.nn.Module:
    model.fedfm_placement = where  # a plain attribute: nn.Module keeps it in __dict__, deepcopy copies it
    return model
