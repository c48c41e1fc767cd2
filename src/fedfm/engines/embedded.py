"""The embedded engine: every client runs in this process, one after another, on one shared model.

The base model is loaded once; before a client trains, its trainable tensors are swapped in from the
task (which the server decoded from the broadcast message), and the client's update leaves as a
serialized message that the server decodes, exactly as it would over a network. A client that
vanishes (``ClientDropout``) is simply missing from the replies, as over a network.
"""

from __future__ import annotations

from collections.abc import Callable

from fedfm.engines.common import Broadcast, check_protocol, received, train_at_client
from fedfm.errors import ClientDropout
from fedfm.types import ClientTask, ClientUpdate, Weights


class EmbeddedEngine:
    """In-process clients, one after another, on one shared base model (default)."""

    name = "embedded"

    def __init__(self, app):
        self.app = app

    def close(self) -> None:
        """Nothing to release: the clients live in this process."""

    def train(
        self, jobs: list[tuple[int, ClientTask]], on_done: Callable[[ClientUpdate], None] | None = None
    ) -> tuple[list[ClientUpdate], int]:
        """Run ``client_train`` for each (client index, task); return the updates received and the bytes sent down.

        Tensors travel as serialized messages both ways: the task's weights (in compression.down precision) and,
        when present, the tensor dict ``config['control']`` (SCAFFOLD's server control variate)."""
        down = Broadcast(self.app)
        updates = []
        for index, task in jobs:
            sent = train_at_client(self.app, index, down.task(task))
            if sent is None:
                continue
            updates.append(received(*sent))
            if on_done:
                on_done(updates[-1])
        return updates, down.bytes

    def call(self, fn: str, jobs: list[tuple[int, bytes]]) -> tuple[dict[int, bytes], int, int]:
        """Run the client function ``fn`` (a protocol step, bytes in and out) at each client.

        Returns the replies of the clients that answered, and the bytes sent down and up.
        """
        check_protocol(fn)
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
