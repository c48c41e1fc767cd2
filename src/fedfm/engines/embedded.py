"""The embedded engine: every client runs in this process, one after another, on one shared model.

The base model is loaded once; before a client trains, its trainable tensors are swapped in from the task, and
its update is handed to the round as soon as it is done (the round folds it in and lets it go), with the length of
the message that would carry it counted. A client that vanishes (``ClientDropout``) is reported as None.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedfm.engines.common import Broadcast, check_protocol, train_at_client
from fedfm.errors import ClientDropout
from fedfm.types import ClientTask, ClientUpdate, Weights


class EmbeddedEngine:
    """In-process clients, one after another, on one shared base model (default)."""

    name = "embedded"

    def __init__(self, app):
        self.app = app

    def close(self) -> None:
        """Nothing to release: the clients live in this process."""

    def train(self, jobs: list[tuple[int, ClientTask]], downlink: Broadcast) -> Iterator[tuple[int, ClientUpdate | None]]:
        """Run ``client_train`` for each (client index, task) in order; yield (index, update or None) as each ends."""
        for index, task in jobs:
            yield index, train_at_client(self.app, index, downlink.task(task))

    def call(self, fn: str, jobs: list[tuple[int, bytes]]) -> tuple[dict[int, bytes], int, int]:
        """Run the client function ``fn`` (a protocol step, bytes in and out) at each client.

        Returns the replies of the clients that answered, and the bytes sent down and up.
        """
        check_protocol(fn)
        replies, down, up = {}, 0, 0
        for index, payload in jobs:
            down += len(payload)
            try:
                reply = self.app.call(fn, index, bytes(payload))
            except ClientDropout:
                continue
            replies[index] = bytes(reply)
            up += len(reply)
        return replies, down, up

    def evaluate(self, jobs: list[tuple[int, Weights]]) -> list[dict[str, float]]:
        """Each client evaluates the given weights on its own test split."""
        return [self.app.client_evaluate(index, weights) for index, weights in jobs]
