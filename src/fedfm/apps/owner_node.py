"""What an owner's machine answers to a Flower message: the owner side of every fedfm message type.

One function, :func:`answer`, turns a message's content (a Flower ``RecordDict``) into the reply's content on the
owner's own data. Two callers run it: the owner worker (``fedfm.apps.worker``), a long-lived process that keeps the
owner's App (model on its device, data, private state) warm for the run, and — for a SuperNode started without a
worker (``fedfm deploy supernode --no-worker``) — the ClientApp process itself, which then builds the App anew for
each message, since Flower starts one ClientApp process per message.

Message types: ``query.hello`` (which owner is this node; owner.json only, no model), ``train``, ``evaluate`` and
``query.call`` (the protocol steps: secure aggregation, CCVR statistics, personal models).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedfm.errors import FedFMError

log = logging.getLogger("fedfm")

KINDS = ("query.hello", "train", "evaluate", "query.call", "query.rag")


@dataclass(frozen=True)
class Node:
    """The owner's machine as a message sees it: its private data directory and its state directory."""

    data_dir: Path
    state_dir: Path

    @classmethod
    def from_node_config(cls, node_config) -> "Node":
        data_dir = node_config.get("data-dir")
        if not data_dir:
            raise FedFMError("this SuperNode has no data-dir in its node config: start it with "
                             "`fedfm deploy supernode --data DIR`")
        state = node_config.get("state-dir") or Path(str(data_dir)) / ".fedfm-state"
        return cls(Path(str(data_dir)), Path(str(state)))


def run_config(rc) -> dict:
    """The fedfm config a Flower run carries (``fedfm run CONFIG --engine flower`` puts it there)."""
    if "fedfm-config" not in rc:
        raise FedFMError("the Flower run has no 'fedfm-config': submit it with `fedfm run CONFIG --engine flower`")
    return json.loads(rc["fedfm-config"])


class OwnerApps:
    """The owner's App per run, built on first use and kept (the worker keeps one run's App warm: a new run's
    config replaces the previous run's App, so the memory held is one model's). Building is serialised with the
    messages that use it: a message arriving while the App is built waits for it instead of building another.
    ``rag``: the owner's federated-RAG endpoint, kept the same way (``fedfm.rag.remote``)."""

    def __init__(self, keep: int = 1):
        self.keep, self.apps, self.lock = keep, {}, threading.RLock()
        self._rag = None

    @property
    def rag(self):
        from fedfm.rag.remote import RagNodes

        if self._rag is None:
            self._rag = RagNodes()
        return self._rag

    def get(self, config: dict, node: Node):
        from fedfm.app import App
        from fedfm.config import RunConfig

        key = (json.dumps(config, sort_keys=True), str(node.data_dir))
        with self.lock:
            if key not in self.apps:
                t0 = time.perf_counter()
                config = {**config, "engine": {**config["engine"], "name": "embedded"}}
                threads = os.environ.get("FEDFM_THREADS")
                if threads:
                    config["engine"]["threads"] = int(threads)
                while len(self.apps) >= self.keep:  # the previous run's model goes before this one's is loaded
                    self.apps.pop(next(iter(self.apps)))
                app = App(RunConfig.model_validate(config), owner=node.data_dir)
                app.uplink = True
                self.apps[key] = app
                log.info("owner App built in %.1f s", time.perf_counter() - t0)
            return self.apps[key]


def use_state(app, node: Node, fedfm_record) -> None:
    """Point the owner's private state across rounds (error feedback, SCAFFOLD's c_i, a secure-aggregation
    round's secrets) at this run's folder on the owner's machine; the run's key is checked to be a plain name."""
    from fedfm.store import ClientStates

    key = str(fedfm_record["state-key"])
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise FedFMError("malformed run state key")
    root = node.state_dir
    if app.client_states is None or app.client_states.dir != root / key:
        # the state holds the owner's DP noise secret: for the owner's account only (a state-dir the operator made
        # keeps its own mode; the run's folder in it is always 0700)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / key).mkdir(mode=0o700, exist_ok=True)
        (root / key).chmod(0o700)
        app.client_states = ClientStates(root / key)


class SecAggState:
    """A secure-aggregation round spans several messages. The owner's round state (its keys, the shares it holds)
    is kept between them in the owner's own state directory (mode 0600) — whether the messages reach a warm worker
    or fresh ClientApp processes, and across a worker's restart — and deleted when the round's last step used it."""

    def __init__(self, app):
        from fedfm.features.private import Private

        self.private, self.path = app.feature(Private), app.client_states.dir / "secagg.pkl"

    def __enter__(self):
        import fcntl
        import pickle

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.path.with_suffix(".lock"), "w")  # one protocol step at a time per owner
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        # written only by this owner's own processes, in its own state folder (mode 0600)
        if self.private is not None:
            self.private.sessions = pickle.loads(self.path.read_bytes()) if self.path.is_file() else {}
        return self

    def __exit__(self, *exc) -> None:
        import pickle
        import tempfile

        try:
            if self.private is None or not self.private.sessions:  # unmasked (the state is consumed) or never started
                self.path.unlink(missing_ok=True)
                return
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".secagg.")
            with os.fdopen(fd, "wb") as f:
                f.write(pickle.dumps(self.private.sessions))
            os.replace(tmp, self.path)
        finally:
            self.lock.close()


def _check_index(app, index: int) -> None:
    if index != app.owner["index"]:
        raise FedFMError(f"task for owner {index} reached the node of owner {app.owner['index']}")


def hello(content, config: dict, node: Node):
    """Which owner this node serves, checked against the run; reads owner.json only (no model, no torch)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedfm.owner import check_owner, count_rows

    want = int(content.config_records["hello"]["num_clients"])  # the federation's size (-1: the owners say it)
    o = check_owner(node.data_dir, config.get("task", "classification"), None if want < 0 else want)
    info = {"index": o["index"], "name": o["name"], "n_train": count_rows(node.data_dir / "train.jsonl"),
            "n_test": count_rows(node.data_dir / "test.jsonl"), "num_clients": o["num_clients"],
            "label_names": json.dumps(o["label_names"])}
    return RecordDict({"owner": ConfigRecord(info)})


def train(app, content, node: Node, setup_s: float):
    from fedfm.engines.flower_engine import task_from_content, update_content
    from fedfm.errors import ClientDropout

    use_state(app, node, content.config_records["fedfm"])
    index, task = task_from_content(content)
    _check_index(app, index)
    t0 = time.perf_counter()
    try:
        with SecAggState(app):  # a masked update needs this round's secure-aggregation keys
            update = app.client_train(index, task)
    except ClientDropout as exc:
        raise FedFMError(f"owner {index} left the round: {exc}") from None
    update.metrics.update(node_setup_s=setup_s, node_train_s=time.perf_counter() - t0)
    return update_content(update, update.delta)


def evaluate(app, content):
    from flwr.app import ConfigRecord, RecordDict

    from fedfm.engines.flower_engine import from_record

    index = int(content.config_records["fedfm"]["index"])
    _check_index(app, index)
    weights = {k: v.float() for k, v in from_record(content.array_records["weights"]).items()}
    metrics = app.client_evaluate(index, weights)
    return RecordDict({"metrics": ConfigRecord({"json": json.dumps(metrics)})})


def call(app, content, node: Node):
    from flwr.app import ConfigRecord, RecordDict

    from fedfm.protocol import PROTOCOL_FUNCTIONS

    use_state(app, node, content.config_records["fedfm"])
    c = content.config_records["call"]
    index, fn = int(c["index"]), str(c["fn"])
    _check_index(app, index)
    if fn not in PROTOCOL_FUNCTIONS:
        raise FedFMError(f"unknown client function {fn!r}")
    with SecAggState(app):
        reply = app.call(fn, index, bytes(c["payload"]))
    return RecordDict({"reply": ConfigRecord({"payload": bytes(reply)})})


def answer(kind: str, content, rc, node: Node, apps: OwnerApps, origin: dict | None = None):
    """The reply content to a message of type ``kind`` with ``content``, from a run whose Flower run config is
    ``rc``, on ``node``. The owner's App comes from ``apps`` (built at the first message of the run that needs it).
    ``origin``: what the node knows of the sender (its SuperLink's address, the run id)."""
    if kind == "query.rag":
        from fedfm.rag.remote import answer_rag

        return answer_rag(content, rc, node, apps.rag, origin or {})
    config = run_config(rc)
    if kind == "query.hello":
        return hello(content, config, node)
    if kind not in KINDS:
        raise FedFMError(f"unknown message type {kind!r}")
    t0 = time.perf_counter()
    app = apps.get(config, node)
    setup_s = time.perf_counter() - t0  # what this message paid (or waited) for the owner's App
    with apps.lock:  # one message at a time uses the App (its model, its optimizer state, its RNG)
        if kind == "train":
            return train(app, content, node, setup_s)
        if kind == "evaluate":
            return evaluate(app, content)
        return call(app, content, node)
