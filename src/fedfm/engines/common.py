"""What every engine does the same way: carry a round's tensors down as messages and an update up as one.

The server's broadcast is serialized once per distinct tensor dict (in ``compression.down`` precision) and
decoded at each receiver; a client's update leaves as one serialized message. Byte counts are the lengths of
those messages, so they mean the same on every engine (the Flower engine also reports what its transport adds).
"""

from __future__ import annotations

from dataclasses import replace

from fedfm import codec
from fedfm.compression import cast_broadcast
from fedfm.errors import ClientDropout
from fedfm.types import ClientTask, ClientUpdate, Weights


class Broadcast:
    """One round's downlink: each distinct tensor dict encoded once, its bytes counted for every receiver."""

    def __init__(self, app):
        # the baselines send nothing: their participants start from the exact weights
        self.precision = app.cfg.compression.down if getattr(app, "uplink", True) else "none"
        self._sent: dict[int, tuple[bytes, Weights]] = {}
        self.bytes = 0

    def message(self, tensors: Weights) -> bytes:
        """The serialized message for ``tensors`` (encoded on first use); counts one receiver."""
        key = id(tensors)
        if key not in self._sent:
            message = codec.encode(cast_broadcast(tensors, self.precision))
            self._sent[key] = (message, {k: v.float() for k, v in codec.decode(message).items()})
        self.bytes += len(self._sent[key][0])
        return self._sent[key][0]

    def carry(self, tensors: Weights) -> Weights:
        """What a receiver decodes from the message for ``tensors`` (shared by all receivers, read-only)."""
        self.message(tensors)
        return self._sent[id(tensors)][1]

    def task(self, task: ClientTask) -> ClientTask:
        """The task as a client receives it: the weights and, when present, SCAFFOLD's server control variate
        (``config['control']``) carried as messages."""
        config = task.config
        if "control" in config:
            config = {**config, "control": self.carry(config["control"])}
        return ClientTask(task.round, self.carry(task.weights), task.num_examples, task.prox_mu, config)


def check_protocol(fn: str) -> None:
    """``fn`` must be one of the client's protocol steps (App.PROTOCOL_FUNCTIONS), whatever carries it."""
    from fedfm.app import PROTOCOL_FUNCTIONS

    if fn not in PROTOCOL_FUNCTIONS:
        raise ValueError(f"unknown client function {fn!r}; expected one of {', '.join(PROTOCOL_FUNCTIONS)}")


def train_at_client(app, index: int, task: ClientTask) -> tuple[ClientUpdate, bytes] | None:
    """Run ``app.client_train`` as the client would: the update (its delta removed) and the message carrying the
    delta, or None when the client vanished."""
    try:
        update = app.client_train(index, task)
    except ClientDropout:
        return None
    return replace(update, delta={}), codec.encode(update.delta)


def received(update: ClientUpdate, message: bytes) -> ClientUpdate:
    """The update as the server holds it after decoding the client's message."""
    return replace(update, delta=codec.decode(message), bytes_up=len(message))
