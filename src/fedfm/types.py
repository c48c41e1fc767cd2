"""The few records that cross the boundaries between server, strategy, engine and client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Weights = dict[str, torch.Tensor]
"""Named trainable tensors (a peft adapter, soft prompt, or full weights) as they travel and as the server keeps
them: float32 on the CPU, whatever a client's device and dtype (``fedfm.placement``)."""


@dataclass(frozen=True)
class ClientTask:
    """What the server asks one client to do in one round."""

    round: int  # 1-based round index
    weights: Weights  # trainable tensors to start from (shared, read-only: clients copy them in)
    num_examples: int | None = None  # training examples to process; None = derive from train config
    prox_mu: float = 0.0  # FedProx proximal coefficient (0 = plain local training)
    config: dict[str, Any] = field(default_factory=dict)  # extra hyper-parameters for the round


@dataclass
class ClientUpdate:
    """What one client sends back: the change of its trainable tensors and what it measured."""

    client: str
    delta: Weights
    num_examples: float  # size of the client's training shard (FedAvg weight; Algorithm 2 may set a fractional one)
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    control: Weights | None = None  # SCAFFOLD: the client's new control variate (kept at the client, never sent)
    optimizer: Weights | None = None  # train.keep_optimizer_state: the client's AdamW state (kept at the client, never sent)


@dataclass
class ServerState:
    """Everything the round loop needs to continue: saved whole in every checkpoint."""

    round: int  # rounds completed
    weights: Weights  # global trainable tensors
    opt: Weights = field(default_factory=dict)  # strategy state (momentum, second moments, ...)


@dataclass(frozen=True)
class Penalty:
    """A quadratic pull of the client's trainable tensors toward an anchor, added to its loss:
    ``coefficient / 2 * sum_k precision_k * (w_k - anchor_k)^2``. Continual learning uses it to keep what earlier
    stages learned: EWC (precision = the federated diagonal Fisher) and L2-SP-style regularisation (precision 1)."""

    anchor: Weights
    coefficient: float
    precision: Weights | None = None  # None: every coordinate weighs 1
