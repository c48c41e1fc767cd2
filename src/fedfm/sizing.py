"""What a config costs before it runs: the model's size, what trains and travels, and a client's peak memory.

The model is built on PyTorch's ``meta`` device from its config alone (no weights are read, so an 8B model is sized
on a laptop in seconds), with the config's peft method applied, and its tensors are counted. Memory is an estimate
from a stated formula, not a measurement (``benchmarks/memory_scale.py`` and ``benchmarks/gpu.py`` measure):

    weights      frozen tensors x bytes(model.dtype); quantized linear layers at 4 bits + NF4's block constants
                 (0.127 bit / weight with double quantisation) or 8 bits + one float per row, and the tensors that
                 peft's k-bit preparation keeps in float32 (norms, embeddings)
    training     trainable tensors x their dtype (float32 for a peft method's tensors), plus the float32 copy of the
                 server's weights the update is measured from
    then the largest of three moments of a client's round, each with the gradients G (trainable x dtype), AdamW's
    moments M (2 x trainable x dtype, allocated by a fresh AdamW at its first step) and the outgoing update U
    (trainable x 4 bytes, float32):
      backward   G + activations: per layer, Korthikanti et al. (2022, eq. 2) for one micro-batch b of s tokens,
                 hidden h, a heads, s*b*h*(34 + 5*a*s/h) bytes at 16 bits (x2 at 32 bits); with gradient
                 checkpointing only each layer's input (2*s*b*h at 16 bits) plus one layer's full activations;
                 plus the logits and their gradient, b*s*vocab x 4 bytes x 2
      step       G + M
      hand-off   M + U (the optimizer is still alive when the update is computed)
    With train.keep_optimizer_state the moments live through the backward pass too (M is added to it).
    Checked against measurements in benchmarks/results/memory_levers.md: for full fine-tuning the step and the
    hand-off, not the activations, set the peak, so checkpointing and micro-batches lower it only where the
    activations are the largest term (long sequences, big batches, LoRA).

Written here because no library sizes a peft + bitsandbytes + activation configuration as one number (accelerate's
``estimate-memory`` covers weights only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.models import PEFT_DEFAULTS, SCRATCH_ARCH, Build, _quiet_transformers, load_tokenizer, resolve_model_path
from fedfm.placement import DTYPES

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
NF4_BITS = 4 + 0.127  # 4-bit codes + double-quantised absmax per 64 weights (Dettmers et al. 2023, section 3)


@dataclass
class Sizing:
    total_params: int
    trainable_params: int
    quantized_params: int  # weights bitsandbytes would store in 4 / 8 bits
    bytes_down: int  # server -> clients per round (float32 trainable tensors to each sampled client)
    bytes_up: int  # clients -> server per round, before compression
    clients_per_round: int | None
    weights_bytes: int  # frozen (or quantized) weights
    training_bytes: int  # trainable weights + the float32 start
    gradient_bytes: int
    optimizer_bytes: int  # AdamW's moments
    update_bytes: int  # the float32 update leaving the client
    activation_bytes: int
    moments_persist: bool = False  # train.keep_optimizer_state: the moments live through the backward pass too

    @property
    def peak_bytes(self) -> int:
        g, m, u, a = self.gradient_bytes, self.optimizer_bytes, self.update_bytes, self.activation_bytes
        backward = g + a + (m if self.moments_persist else 0)
        return self.weights_bytes + self.training_bytes + max(backward, g + m, m + u)

    def rows(self) -> list[tuple[str, str]]:
        gib = 2**30
        per = f" ({self.clients_per_round} clients)" if self.clients_per_round else " per client"
        return [
            ("parameters", f"{self.total_params:,}"),
            ("trainable (travels)", f"{self.trainable_params:,} ({100 * self.trainable_params / self.total_params:.3f}%)"),
            ("quantized", f"{self.quantized_params:,}" if self.quantized_params else "none"),
            ("bytes per round, down", f"{self.bytes_down / 1e6:,.1f} MB{per}"),
            ("bytes per round, up", f"{self.bytes_up / 1e6:,.1f} MB{per}, before compression"),
            ("client memory: weights", f"{self.weights_bytes / gib:.2f} GiB"),
            ("client memory: trainable weights + start", f"{self.training_bytes / gib:.2f} GiB"),
            ("client memory: gradients", f"{self.gradient_bytes / gib:.2f} GiB"),
            ("client memory: AdamW moments", f"{self.optimizer_bytes / gib:.2f} GiB"),
            ("client memory: update out", f"{self.update_bytes / gib:.2f} GiB"),
            ("client memory: activations", f"{self.activation_bytes / gib:.2f} GiB"),
            ("client peak (estimate)", f"{self.peak_bytes / gib:.2f} GiB (formula: fedfm.sizing)"),
        ]


def meta_model(cfg) -> torch.nn.Module:
    """The config's model with its peft method, on the meta device: shapes without storage."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    _quiet_transformers()
    if cfg.model.source == "scratch":
        vocab = cfg.model.vocab_size if cfg.model.tokenizer == "bpe" else len(load_tokenizer(cfg.model.tokenizer))
        config = LlamaConfig(**{**SCRATCH_ARCH, **cfg.model.arch}, vocab_size=vocab)
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.source))
    kinds = {"classification": AutoModelForSequenceClassification, "retrieval": AutoModel}
    task_types = {"classification": "SEQ_CLS", "retrieval": "FEATURE_EXTRACTION"}
    with torch.device("meta"):
        model = kinds.get(cfg.task, AutoModelForCausalLM).from_config(config, dtype=DTYPES[cfg.model.dtype])
        # the classification head's size depends on the data's labels (a few hundred numbers): sized with 2 here
        return Build(cfg.peft, cfg.seed).wrap(model, task_types.get(cfg.task, "CAUSAL_LM"))


def _quantizable(model: torch.nn.Module) -> int:
    """Weights of the linear layers bitsandbytes replaces (every nn.Linear but the output and task heads)."""
    skip = ("lm_head", "classifier", "score", "pooler")
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip) and "lora_" not in n)


def estimate(cfg) -> Sizing:
    model = meta_model(cfg)
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    store = BYTES[DTYPES[cfg.model.dtype]]
    quantized = _quantizable(model) if cfg.model.quantization else 0
    frozen = total - trainable - quantized
    if cfg.model.quantization == "4bit":
        weights = quantized * NF4_BITS / 8 + frozen * 4  # peft's k-bit preparation: the rest in float32
    elif cfg.model.quantization == "8bit":
        weights = quantized * 1.0 + frozen * 4
    else:
        weights = frozen * store
    train_dtype = 4 if cfg.peft.method != "none" else store
    n = cfg.federation.num_clients
    clients = max(1, round(n * cfg.federation.fraction)) if n else None
    up = down = trainable * 4 * (clients or 1)
    return Sizing(total, trainable, quantized, down, up, clients, int(weights),
                  training_bytes=trainable * (train_dtype + 4), gradient_bytes=trainable * train_dtype,
                  optimizer_bytes=trainable * 2 * train_dtype, update_bytes=trainable * 4,
                  activation_bytes=int(activations(model.config, cfg)), moments_persist=cfg.train.keep_optimizer_state)


def activations(config, cfg) -> float:
    """Activation bytes of one micro-batch's forward + backward (see the module's formula)."""
    b = cfg.train.micro_batch_size or cfg.train.batch_size
    # prompt methods lengthen every sequence by their virtual tokens
    s = cfg.data.max_length + {**PEFT_DEFAULTS.get(cfg.peft.method, {}), **cfg.peft.options}.get("num_virtual_tokens", 0)
    h, a = config.hidden_size, config.num_attention_heads
    layers, vocab = config.num_hidden_layers, config.vocab_size
    half = cfg.train.mixed_precision != "no" or cfg.model.dtype != "float32"
    scale = 1 if half else 2
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale
    if cfg.train.gradient_checkpointing:
        body = layers * 2 * s * b * h * scale + per_layer
    else:
        body = layers * per_layer
    head = b * s * vocab * 4 * 2 if cfg.task in ("causal_lm", "instruction") else 0
    return body + head
