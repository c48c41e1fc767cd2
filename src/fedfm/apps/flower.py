"""Flower's ServerApp and ClientApp for fedfm: the entry points a SuperLink and the owners' SuperNodes run.

The ServerApp builds the run's App and runs fedfm's own round loop (``fedfm.server``) with the Flower engine
(``fedfm.engines.flower_engine``), which only carries messages. The ClientApp, which Flower starts afresh for each
message on the owner's SuperNode, forwards the message to the owner's long-lived worker (``fedfm.apps.worker``),
which answers from the owner's App kept warm for the run (``fedfm.apps.owner_node``: the same ``client_train`` /
``client_evaluate`` / protocol steps as every engine). They live apart from the engine so that the engine never
imports the round loop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedfm.apps.owner_node import run_config
from fedfm.engines.flower_engine import FlowerEngine
from fedfm.errors import FedFMError

log = logging.getLogger("fedfm")


def _run_config(context) -> tuple[dict, dict]:
    return run_config(context.run_config), context.run_config


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
        # the coordinator holds no owner data: the owners say who they are, then its App is built from their answers
        # (names, label set) and its own test file, if it has one (engine.server_test)
        engine = FlowerEngine(None, grid, cfg=cfg)
        kept = run_dir / "flower.json"  # a resumed run: the owners' names as recorded (an owner may be down now)
        known = json.loads(kept.read_text()).get("owners") if rc.get("resume") and kept.is_file() else None
        app = App(cfg, coordinator=engine.coordinator(cfg.engine.server_test, known))
        engine.attach(app)
        app._engine = engine  # a resumed run's state key is read back from the run directory by the engine
        try:
            if rc.get("resume"):
                server.resume(app, run_dir)
            else:
                server.run_method(app, "federated", run_dir)
        finally:
            if run_dir.is_dir():
                atomic_write_text(run_dir / "nodes.json", json.dumps(
                    {"owners": engine.roster, "wire_bytes": engine.wire_bytes, "node_seconds": engine.node_seconds,
                     "coordinator": {"test_file": cfg.engine.server_test, "examples": len(app.dataset.texts),
                                     "evaluation": "owners" if app.evaluate_at_owners else "coordinator test file"}},
                    indent=1))
            close_engine(app)

    return server_app


def make_rag_server_app():
    """The ServerApp of a federated-RAG job (``fedfm rag index|ask|eval --engine flower``)."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        from fedfm.rag.remote import serve_rag

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("fedfm").setLevel(logging.INFO)
        serve_rag(grid, context.run_config)

    return server_app


def make_client_app():
    """The ClientApp: forwards each message to the owner's worker (``fedfm.apps.worker``), or — on a SuperNode
    started with ``--no-worker`` — answers it in this process, building the owner's App for this message."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fedfm.apps.owner_node import Node, OwnerApps, answer

    client_app = ClientApp()
    apps = OwnerApps()  # without a worker: lives as long as this process, which Flower ends after one message

    def reply(kind: str, msg: Message, context) -> Message:
        wdir = context.node_config.get("worker-dir")
        # what this node knows of the sender: the SuperLink it is connected to (TLS, the federation's CA) and the run
        origin = {"superlink": str(context.node_config.get("superlink", "")), "run": str(context.run_id)}
        if wdir:
            from fedfm.apps.worker import forward

            timeout = float(msg.metadata.ttl or 600.0)  # past it the SuperLink has dropped the message anyway
            content = forward(Path(str(wdir)), kind, msg.content, context.run_config, timeout + 60.0, origin=origin)
        else:
            content = answer(kind, msg.content, context.run_config, Node.from_node_config(context.node_config), apps,
                             origin)
        return Message(content, reply_to=msg)

    @client_app.query("hello")
    def hello(msg: Message, context) -> Message:
        return reply("query.hello", msg, context)

    @client_app.train()
    def train(msg: Message, context) -> Message:
        return reply("train", msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return reply("evaluate", msg, context)

    @client_app.query("call")
    def call(msg: Message, context) -> Message:
        return reply("query.call", msg, context)

    @client_app.query("rag")
    def rag(msg: Message, context) -> Message:
        return reply("query.rag", msg, context)

    return client_app
