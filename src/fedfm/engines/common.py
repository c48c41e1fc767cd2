"""What every engine does the same way: carry a round's tensors down as messages and an update up as one.

Byte counts are the lengths of the serialized messages (safetensors, ``fedfm.codec``), so they mean the same on
every engine (the Flower engine also reports what its own transport adds). The downlink of a round is encoded once
per distinct tensor dict, in ``compression.down`` precision. In one process nothing needs to cross a wire: a
receiver gets the tensors as the message would carry them (the server's own, read-only, when the precision is
float32), so a round holds one copy of the global model however many clients it asks.
"""

from __future__ import annotations

from dataclasses import replace

from fedfm import codec
from fedfm.compression import cast_broadcast
from fedfm.errors import ClientDropout
from fedfm.protocol import PROTOCOL_FUNCTIONS
from fedfm.types import ClientTask, ClientUpdate, Weights


class Broadcast:
    """One round's downlink: each distinct tensor dict measured once, its bytes counted for every receiver."""

    def __init__(self, precision: str = "none"):
        self.precision = precision  # compression.down; the baselines send nothing and pass "none"
        self._sent: dict[int, tuple[int, Weights]] = {}  # id(tensors) -> (message length, what a receiver decodes)
        self.bytes = 0

    @classmethod
    def of(cls, app) -> Broadcast:
        """The downlink of ``app``'s current method (the baselines start from the exact weights)."""
        return cls(app.cfg.compression.down if getattr(app, "uplink", True) else "none")

    def _entry(self, tensors: Weights) -> tuple[int, Weights]:
        key = id(tensors)
        if key not in self._sent:
            cast = cast_broadcast(tensors, self.precision)
            carried = tensors if self.precision == "none" else {k: v.float() for k, v in cast.items()}
            self._sent[key] = (len(codec.encode(cast)), carried)
        return self._sent[key]

    def count(self, tensors: Weights) -> int:
        """Count one receiver of ``tensors``; returns the message's length."""
        size = self._entry(tensors)[0]
        self.bytes += size
        return size

    def cast(self, tensors: Weights) -> Weights:
        """``tensors`` in the downlink precision (what an engine that serializes puts on the wire; not counted)."""
        return cast_broadcast(tensors, self.precision)

    def carry(self, tensors: Weights) -> Weights:
        """Count one receiver; what it decodes from the message (shared by all receivers, read-only)."""
        self.count(tensors)
        return self._entry(tensors)[1]

    def task(self, task: ClientTask) -> ClientTask:
        """The task as a client receives it: the weights and, when present, SCAFFOLD's server control variate
        (``config['control']``) carried as messages."""
        config = task.config
        if "control" in config:
            config = {**config, "control": self.carry(config["control"])}
        return replace(task, weights=self.carry(task.weights), config=config)


def check_protocol(fn: str) -> None:
    """``fn`` must be one of the client's protocol steps, whatever carries it."""
    if fn not in PROTOCOL_FUNCTIONS:
        raise ValueError(f"unknown client function {fn!r}; expected one of {', '.join(PROTOCOL_FUNCTIONS)}")


def train_at_client(app, index: int, task: ClientTask) -> ClientUpdate | None:
    """Run ``app.client_train`` as the client would; the update with ``bytes_up`` set to the length of the message
    that carries its delta, or None when the client vanished."""
    try:
        update = app.client_train(index, task)
    except ClientDropout:
        return None
    return replace(update, bytes_up=len(codec.encode(update.delta)))


def serialized(update: ClientUpdate) -> tuple[ClientUpdate, bytes]:
    """An update as it crosses a process boundary: its metadata and the message carrying its delta."""
    return replace(update, delta={}), codec.encode(update.delta)


def received(update: ClientUpdate, message: bytes) -> ClientUpdate:
    """The update as the server holds it after decoding the client's message."""
    return replace(update, delta=codec.decode(message), bytes_up=len(message))
