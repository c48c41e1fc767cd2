"""Flower's ServerApp and ClientApp for fedfm: the entry points a SuperLink and the owners' SuperNodes run.

The ServerApp builds the run's App and runs fedfm's own round loop (``fedfm.server``) with the Flower engine
(``fedfm.engines.flower_engine``), which only carries messages; the ClientApp, run by each owner's SuperNode,
builds the owner's App from the private directory in its node config (``data-dir``) and answers with the same
``App.client_train`` / ``client_evaluate`` / protocol steps as every engine. They live apart from the engine so
that the engine never imports the round loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from fedfm.engines.flower_engine import (
    FlowerEngine, from_record, task_from_content, update_content,
)
from fedfm.errors import FedFMError

log = logging.getLogger("fedfm")


def _run_config(context) -> tuple[dict, dict]:
    rc = context.run_config
    if "fedfm-config" not in rc:
        raise FedFMError("the Flower run has no 'fedfm-config': submit it with `fedfm run CONFIG --engine flower`")
    config = json.loads(rc["fedfm-config"])
    return config, rc


def make_server_app():
    """The ServerApp: fedfm's round loop with this engine."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        from fedfm import server
        from fedfm.app import App
        from fedfm.config import RunConfig
        from fedfm.engines import close_engine
        from fedfm.rundir import atomic_write_text

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("fedfm").setLevel(logging.INFO)
        config, rc = _run_config(context)
        cfg = RunConfig.model_validate(config)
        run_dir = Path(str(rc["run-dir"]))
        if not rc.get("resume") and run_dir.exists() and any(run_dir.iterdir()):
            raise FedFMError(f"run directory {run_dir} already exists on the SuperLink's machine")
        app = App(cfg)
        engine = FlowerEngine(app, grid)
        app._engine = engine  # a resumed run's state key is read back from the run directory by the engine
        try:
            if rc.get("resume"):
                server.resume(app, run_dir)
            else:
                server.run_method(app, "federated", run_dir)
        finally:
            if run_dir.is_dir():
                atomic_write_text(run_dir / "nodes.json", json.dumps(
                    {"owners": engine.roster, "wire_bytes": engine.wire_bytes, "node_seconds": engine.node_seconds},
                    indent=1))
            close_engine(app)

    return server_app


_OWNER_APPS: dict[tuple, object] = {}


def _data_dir(context) -> str:
    data_dir = context.node_config.get("data-dir")
    if not data_dir:
        raise FedFMError("this SuperNode has no data-dir in its node config: start it with "
                         "`fedfm deploy supernode --data DIR`")
    return str(data_dir)


def _owner_app(context):
    """The owner's App for this run (kept for the process's life; Flower starts one ClientApp process per
    message, so each message pays for loading the model, which is memory-mapped from safetensors)."""
    from fedfm.app import App
    from fedfm.config import RunConfig
    config, _ = _run_config(context)
    data_dir = _data_dir(context)
    key = (json.dumps(config, sort_keys=True), str(data_dir))
    if key not in _OWNER_APPS:
        t0 = time.perf_counter()
        config["engine"] = {**config["engine"], "name": "embedded"}
        threads = os.environ.get("FEDFM_THREADS")
        if threads:
            config["engine"]["threads"] = int(threads)
        cfg = RunConfig.model_validate(config)
        app = App(cfg, owner=Path(str(data_dir)))
        app.uplink = True
        app.setup_s = time.perf_counter() - t0  # what this message paid to load the owner's App
        _OWNER_APPS[key] = app
    return _OWNER_APPS[key]


def _use_state(app, context, msg) -> None:
    """Point the owner's private state across rounds (error feedback, SCAFFOLD's c_i, a secure-aggregation
    round's secrets) at this run's folder on the owner's machine; the run's key is checked to be a plain name."""
    from fedfm.store import ClientStates

    key = str(msg.content.config_records["fedfm"]["state-key"])
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise FedFMError("malformed run state key")
    root = Path(str(context.node_config.get("state-dir") or Path(_data_dir(context)) / ".fedfm-state"))
    if app.client_states is None or app.client_states.dir != root / key:
        # the state holds the owner's DP noise secret: for the owner's account only (a state-dir the operator made
        # keeps its own mode; the run's folder in it is always 0700)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / key).mkdir(mode=0o700, exist_ok=True)
        (root / key).chmod(0o700)
        app.client_states = ClientStates(root / key)


class _SecAggState:
    """A secure-aggregation round spans several messages, and Flower runs each message in a fresh ClientApp
    process: the owner's round state (its keys, the shares it holds) is kept between them in the owner's own
    state directory (mode 0600), and deleted when the round's last step has used it."""

    def __init__(self, app):
        from fedfm.features.private import Private

        self.private, self.path = app.feature(Private), app.client_states.dir / "secagg.pkl"

    def __enter__(self):
        import fcntl
        import pickle

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.path.with_suffix(".lock"), "w")  # one protocol step at a time per owner
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        # written only by this owner's own ClientApp, in its own state folder (mode 0600)
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


def make_client_app():
    """The ClientApp: fedfm's client functions on the owner's data."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    def check_index(app, index: int) -> None:
        if index != app.owner["index"]:
            raise FedFMError(f"task for owner {index} reached the node of owner {app.owner['index']}")

    @client_app.query("hello")
    def hello(msg: Message, context) -> Message:
        """Which owner this node serves, checked against the run; reads owner.json only (no model, no torch)."""
        from fedfm.owner import check_owner, count_rows

        config, _ = _run_config(context)
        d = Path(str(_data_dir(context)))
        want = int(msg.content.config_records["hello"]["num_clients"])  # the size of the coordinator's split
        o = check_owner(d, config.get("task", "classification"), want)
        info = {"index": o["index"], "name": o["name"], "n_train": count_rows(d / "train.jsonl"),
                "n_test": count_rows(d / "test.jsonl")}
        return Message(RecordDict({"owner": ConfigRecord(info)}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context) -> Message:
        from fedfm.errors import ClientDropout

        app = _owner_app(context)
        _use_state(app, context, msg)
        index, task = task_from_content(msg.content)
        check_index(app, index)
        t0 = time.perf_counter()
        try:
            with _SecAggState(app):  # a masked update needs this round's secure-aggregation keys
                update = app.client_train(index, task)
        except ClientDropout as exc:
            raise FedFMError(f"owner {index} left the round: {exc}") from None
        update.metrics.update(node_setup_s=app.setup_s, node_train_s=time.perf_counter() - t0)
        return Message(update_content(update, update.delta), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        app = _owner_app(context)
        index = int(msg.content.config_records["fedfm"]["index"])
        check_index(app, index)
        weights = {k: v.float() for k, v in from_record(msg.content.array_records["weights"]).items()}
        metrics = app.client_evaluate(index, weights)
        return Message(RecordDict({"metrics": ConfigRecord({"json": json.dumps(metrics)})}), reply_to=msg)

    @client_app.query("call")
    def call(msg: Message, context) -> Message:
        app = _owner_app(context)
        _use_state(app, context, msg)
        c = msg.content.config_records["call"]
        index, fn = int(c["index"]), str(c["fn"])
        check_index(app, index)
        from fedfm.protocol import PROTOCOL_FUNCTIONS

        if fn not in PROTOCOL_FUNCTIONS:
            raise FedFMError(f"unknown client function {fn!r}")
        with _SecAggState(app):
            reply = app.call(fn, index, bytes(c["payload"]))
        return Message(RecordDict({"reply": ConfigRecord({"payload": bytes(reply)})}), reply_to=msg)

    return client_app
