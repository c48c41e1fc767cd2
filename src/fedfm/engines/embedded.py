"""The embedded engine: every client runs in this process, one after another, on one shared model.

The base model is loaded once; before a client trains, its trainable tensors are swapped in from the
task (which the server decoded from the broadcast message), and the client's update leaves as a
serialized message that the server decodes, exactly as it would over a network. A client that
vanishes (``ClientDropout``) is simply missing from the replies, as over a network.
"""

from __future__ import annotations

from collections.abc import Callable

from fedfm import codec
from fedfm.compression import cast_broadcast
from fedfm.errors import ClientDropout
from fedfm.types import ClientTask, ClientUpdate, Weights


class EmbeddedEngine:
    """In-process clients, one after another, on one shared base model (default)."""

    name = "embedded"

    def __init__(self, app):
        self.app = app

    def train(
        self, jobs: list[tuple[int, ClientTask]], on_done: Callable[[ClientUpdate], None] | None = None
    ) -> tuple[list[ClientUpdate], int]:
        """Run ``client_train`` for each (client index, task); return the updates received and the bytes sent down.

        Tensors travel as serialized messages both ways: the task's weights (in compression.down precision) and,
        when present, the tensor dict ``config['control']`` (SCAFFOLD's server control variate)."""
        received: dict[int, tuple[Weights, int]] = {}  # one broadcast message per distinct tensor dict
        # the baselines send nothing: their participants start from the exact weights
        precision = self.app.cfg.compression.down if getattr(self.app, "uplink", True) else "none"
        updates, bytes_down = [], 0

        def carry(tensors: Weights) -> Weights:
            nonlocal bytes_down
            key = id(tensors)
            if key not in received:
                message = codec.encode(cast_broadcast(tensors, precision))
                received[key] = ({k: v.float() for k, v in codec.decode(message).items()}, len(message))
            bytes_down += received[key][1]
            return received[key][0]

        for index, task in jobs:
            weights = carry(task.weights)
            config = {**task.config, "control": carry(task.config["control"])} if "control" in task.config else task.config
            try:
                update = self.app.client_train(index, ClientTask(task.round, weights, task.num_examples, task.prox_mu, config))
            except ClientDropout:
                continue
            message = codec.encode(update.delta)
            update.delta, update.bytes_up = codec.decode(message), len(message)
            updates.append(update)
            if on_done:
                on_done(update)
        return updates, bytes_down

    def call(self, fn: str, jobs: list[tuple[int, bytes]]) -> tuple[dict[int, bytes], int, int]:
        """Run the client function ``fn`` (a protocol step, bytes in and out) at each client.

        Returns the replies of the clients that answered, and the bytes sent down and up.
        """
        from fedfm.app import PROTOCOL_FUNCTIONS

        if fn not in PROTOCOL_FUNCTIONS:
            raise ValueError(f"unknown client function {fn!r}; expected one of {', '.join(PROTOCOL_FUNCTIONS)}")
        replies, down, up = {}, 0, 0
        for index, payload in jobs:
            down += len(payload)
            try:
                reply = getattr(self.app, fn)(index, bytes(payload))
            except ClientDropout:
                continue
            replies[index] = bytes(reply)
            up += len(reply)
        return replies, down, up

    def evaluate(self, jobs: list[tuple[int, Weights]]) -> list[dict[str, float]]:
        """Each client evaluates the given weights on its own test split."""
        return [self.app.client_evaluate(index, weights) for index, weights in jobs]
