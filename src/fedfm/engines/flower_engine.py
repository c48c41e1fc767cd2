"""The Flower engine: client tasks as Flower messages to the owners' SuperNodes, through a ServerApp's ``Grid``.

fedfm's own round loop runs inside Flower's ServerApp (``fedfm.apps.flower``); this engine only sends each client
task as a ``Message`` to the SuperNode of the owner it is for and turns the replies back into ``ClientUpdate``\\ s,
yielded as they arrive. The ClientApp (also in ``fedfm.apps.flower``) answers with the same ``App.client_train``
/ ``client_evaluate`` as every engine. No training or aggregation code lives here.

Wire format: tensors travel as Flower ``ArrayRecord``\\ s (Flower splits large arrays into chunks on the wire),
scalars and JSON in ``ConfigRecord``\\ s. numpy has no bfloat16, so a bf16 tensor travels as its int16 bit pattern
under a ``bf16:`` name prefix and is viewed back on arrival (exact). Reported ``bytes_up``/``bytes_down`` are the
same message lengths as on the other engines (``fedfm.engines.common``), so runs compare across engines.

Owners are matched to federation indices by asking every connected node who it is (``query.hello``); an owner
that does not answer, or answers with an error (a missing data directory, a malformed one), is logged at the
server with the node's own message and counts as vanished whenever it is sampled. A node that connects after the
start is asked at the next round and joins from then on (not under secure aggregation, whose round keys are set up
before training); a node asked once is not asked again (a restarted node keeps its id, and its owner).
"""

from __future__ import annotations

import json
import math
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from fedfm.errors import FedFMError

if TYPE_CHECKING:
    from fedfm.types import ClientTask, ClientUpdate, Weights

# torch and the client code are imported inside the functions that use them: a node's first message (which
# owner are you?) then starts in well under a second instead of paying for torch and transformers

log = logging.getLogger("fedfm")

BF16 = "bf16:"


# --- records ------------------------------------------------------------------------------------------
def to_record(tensors: Weights):
    """Named tensors -> ArrayRecord (bf16 as its int16 bit pattern; numpy has no bfloat16)."""
    import torch
    from flwr.app import ArrayRecord

    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.dtype == torch.bfloat16:
            out[BF16 + k] = v.view(torch.int16)
        else:
            out[k] = v
    return ArrayRecord(torch_state_dict=out)


def from_record(record) -> Weights:
    import torch

    out = {}
    for k, v in record.to_torch_state_dict().items():
        if k.startswith(BF16):
            out[k[len(BF16):]] = v.view(torch.bfloat16)
        else:
            out[k] = v
    return out


def payload_bytes(content) -> int:
    """Bytes of the arrays a Flower message carries (what its transport chunks and sends, before framing)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def task_content(task: ClientTask, index: int, weights: Weights, control: Weights | None):
    """A ClientTask as a Flower RecordDict (``weights``/``control`` as the broadcast message carries them)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedfm.types import Penalty

    extra, records = {}, {"weights": to_record(weights)}
    for key, value in task.config.items():
        if key == "control":
            records["control"] = to_record(control)
        elif isinstance(value, Penalty):
            records["penalty.anchor"] = to_record(value.anchor)
            if value.precision is not None:
                records["penalty.precision"] = to_record(value.precision)
            extra["penalty"] = {"coefficient": value.coefficient}
        else:
            extra[key] = value
    records["task"] = ConfigRecord({
        "round": task.round, "index": index, "num_examples": -1 if task.num_examples is None else task.num_examples,
        "prox_mu": float(task.prox_mu), "config": json.dumps(extra),
    })
    return RecordDict(records)


def task_from_content(content) -> tuple[int, ClientTask]:
    from fedfm.types import ClientTask, Penalty

    t = content.config_records["task"]
    config = json.loads(t["config"])
    arrays = content.array_records
    if "control" in arrays:
        config["control"] = {k: v.float() for k, v in from_record(arrays["control"]).items()}
    if "penalty" in config:
        precision = from_record(arrays["penalty.precision"]) if "penalty.precision" in arrays else None
        config["penalty"] = Penalty(from_record(arrays["penalty.anchor"]), config["penalty"]["coefficient"], precision)
    weights = {k: v.float() for k, v in from_record(arrays["weights"]).items()}
    n = int(t["num_examples"])
    return int(t["index"]), ClientTask(int(t["round"]), weights, None if n < 0 else n, float(t["prox_mu"]), config)


def update_content(update: ClientUpdate, delta: Weights):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({
        "delta": to_record(delta),
        "update": ConfigRecord({"client": update.client, "num_examples": float(update.num_examples),
                                "metrics": json.dumps(update.metrics)}),
    })


def number_dict(text: str, required: tuple[str, ...] = (), finite: bool = True) -> dict[str, float]:
    """A node's JSON metrics, accepted only as a dict of numbers (finite unless ``finite`` is False: an owner with no
    test examples evaluates to NaN) holding ``required``; ValueError otherwise. The round record and the aggregate
    read them, so a buggy or hostile node must not reach them with anything else."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"metrics are a {type(d).__name__}, not a dict")

    def number(v) -> bool:
        try:  # a 400-digit JSON integer is an int that math.isfinite cannot take (OverflowError)
            return not isinstance(v, bool) and isinstance(v, (int, float)) and (not finite or math.isfinite(float(v)))
        except OverflowError:
            return False

    bad = [k for k, v in d.items() if not number(v)]
    if bad:
        raise ValueError(f"metrics {bad} are not {'finite ' if finite else ''}numbers")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"metrics {missing} are missing")
    return d


def update_from_content(content) -> tuple[ClientUpdate, Weights]:
    from fedfm.types import ClientUpdate

    u = content.config_records["update"]
    metrics = number_dict(u["metrics"], ("steps", "examples_seen", "lr"))  # train_loss stays home under secagg
    update = ClientUpdate(str(u["client"]), {}, float(u["num_examples"]), metrics)
    return update, from_record(content.array_records["delta"])


# --- the engine (inside the ServerApp) -------------------------------------------------------------------
class FlowerEngine:
    """Client tasks as Flower messages to the owners' SuperNodes, through the ServerApp's Grid."""

    name = "flower"

    def __init__(self, app, grid=None, cfg=None):
        """``app`` None (with ``cfg``): the coordinator's App is built after the owners answered (it holds no owner
        data: :meth:`coordinator` says what it needs from them), then :meth:`attach`\ ed."""
        if grid is None:
            raise FedFMError("engine 'flower' runs inside a Flower ServerApp: start a SuperLink and the owners' "
                             "SuperNodes (fedfm deploy ...), then `fedfm run CONFIG --engine flower --federation HOST:PORT`")
        self.app, self.grid, self.cfg = app, grid, cfg or app.cfg
        self.timeout = self.cfg.engine.timeout_s
        # the federation's size: the coordinator's split's, or the config's, or (a natural partition) the owners' own
        self.want: int | None = len(app.split.client_names) if app is not None else self.cfg.federation.num_clients
        self.infos: dict[int, dict] = {}  # federation index -> what its node reported
        self.nodes: dict[int, int] = {}  # federation index -> node id
        self.sizes: dict[int, tuple[int, int]] = {}  # federation index -> (train, test) examples its node reported
        # names the owners' private state for this run on their machines (kept in the run directory: a resumed run
        # finds the same state, a new run never reads another run's)
        self.state_key = uuid.uuid4().hex
        self.key_kept = False  # whether the key was read from / written to the run directory yet
        self.roster: list[dict] = []  # every node that answered (or failed to): shown in the run directory
        self.wire_bytes = {"down": 0, "up": 0}  # what the Flower records held (the engine-independent counts are kept)
        self.node_seconds: list[dict] = []  # per training reply: the ClientApp's App loading and training time
        self.connect()

    def close(self) -> None:
        """The ServerApp's process ends with the run; nothing to release."""

    # -- the coordinator's App
    def coordinator(self, test_file: str | None = None, known: list[str] | None = None) -> dict:
        """What the coordinator's App is built from (``App(cfg, coordinator=...)``): the owners' names by index, as
        their nodes reported them (``known``: as a resumed run recorded them, for owners whose node is down), the
        label set they share, and the coordinator's own test file (or None)."""
        labels = {json.dumps(i.get("label_names", [])) for i in self.infos.values()}
        if len(labels) > 1:
            raise FedFMError(f"the owners' label sets differ: {sorted(labels)}; export them from one config")
        if test_file is not None and not Path(test_file).is_file():
            raise FedFMError(f"the coordinator's test file {test_file} (engine.server_test) does not exist")
        known = known or []
        names = [self.infos[i]["name"] if i in self.infos else known[i] if i < len(known) else f"owner-{i}"
                 for i in range(self.want or 0)]
        return {"names": names, "label_names": json.loads(labels.pop()) if labels else [], "test_file": test_file}

    def attach(self, app) -> None:
        """Use ``app`` (the coordinator's); with no test set of its own, evaluation is the owners'."""
        self.app = app
        if not len(app.global_test):
            app.evaluate_at_owners = self.owners_evaluate

    def owners_evaluate(self, weights: Weights) -> dict[str, float]:
        """The model on every owner's own test split; the mean of their metrics weighted by split size (what one
        test set pooled from theirs would give for accuracy and loss)."""
        got = [(i, m) for i, m in zip(sorted(self.nodes), self.evaluate([(i, weights) for i in sorted(self.nodes)]))
               if m is not None and self.sizes[i][1] > 0]
        if not got:
            raise FedFMError("no owner reported an evaluation, and the coordinator has no test set of its own "
                             "(engine.server_test)")
        keys = set.intersection(*(set(m) for _, m in got))
        total = sum(self.sizes[i][1] for i, _ in got)
        out = {k: sum(self.sizes[i][1] * m[k] for i, m in got) / total for k in sorted(keys)}
        return {**out, "eval_owners": len(got), "eval_examples": total}

    # -- discovery
    def connect(self) -> None:
        """Wait for the federation's SuperNodes, then ask each which owner it serves."""
        deadline = time.monotonic() + self.cfg.engine.connect_s
        ids = list(self.grid.get_node_ids())
        while not ids and time.monotonic() < deadline:
            time.sleep(1.0)
            ids = list(self.grid.get_node_ids())
        if not ids:
            raise FedFMError("no SuperNode is connected to the SuperLink: start the owners' nodes first "
                             "(fedfm deploy supernode --data DIR ...)")
        if self.want is None:  # a natural partition's size: the first owners to answer say it (owner.json)
            self.discover(ids)
        while (self.want is None or len(ids) < self.want) and time.monotonic() < deadline:
            time.sleep(1.0)
            ids = list(self.grid.get_node_ids())
        self.discover_new()
        need = self.cfg.federation.min_clients
        if len(self.nodes) < need:
            errors = "; ".join(f"node {r['node']}: {r.get('error', r['status'])}" for r in self.roster if r["status"] != "ok")
            raise FedFMError(f"only {len(self.nodes)} of {self.want} owners are reachable (federation.min_clients={need})"
                             + (f": {errors}" if errors else ""))

    def discover_new(self) -> None:
        """Ask nodes that connected since the last look which owner they serve (an owner whose node came up after
        the start joins from the next round). A node asked once is not asked again: a restarted node keeps its id."""
        asked = {r["node"] for r in self.roster}
        new = [n for n in self.grid.get_node_ids() if n not in asked]
        if new:
            self.discover(new)

    def discover(self, ids: list[int]) -> None:
        """Ask nodes ``ids`` which owner they serve; record every answer (or its absence) in the roster."""
        from flwr.app import ConfigRecord, Message, RecordDict

        hello = [Message(RecordDict({"hello": ConfigRecord({"num_clients": -1 if self.want is None else self.want})}),
                         dst_node_id=n, message_type="query.hello") for n in ids]
        got = list(self.grid.send_and_receive(hello, timeout=self.timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in hello}
        replies = {asked[m.metadata.reply_to_message_id]: m for m in got if m.metadata.reply_to_message_id in asked}
        for node in ids:
            m = replies.get(node)
            if m is None:
                self.roster.append({"node": node, "status": "no reply"})
                log.warning("node %d did not answer who it is within %.0f s", node, self.timeout)
                continue
            if m.has_error():
                reason = m.error.reason
                self.roster.append({"node": node, "status": "error", "error": reason})
                log.error("node %d cannot take part: %s", node, reason)
                continue
            try:
                info = dict(m.content.config_records["owner"])
                index = int(info["index"])
                reported = (int(info["n_train"]), int(info["n_test"]))
                info["label_names"] = json.loads(str(info.get("label_names", "[]")))
                if self.want is None:
                    self.want = int(info["num_clients"])
            except (KeyError, TypeError, ValueError) as exc:
                self.roster.append({"node": node, "status": "error", "error": f"malformed reply: {exc!r}"})
                log.error("node %d sent a malformed answer: %r", node, exc)
                continue
            want = self.want
            if not 0 <= index < want:
                self.roster.append({"node": node, "status": "error", "error": f"owner index {index} out of range"})
                log.error("node %d claims owner index %d, outside 0..%d", node, index, want - 1)
                continue
            if index in self.nodes:
                self.roster.append({"node": node, "status": "duplicate", **info})
                log.error("node %d claims owner index %d, already served by node %d: ignored", node, index,
                          self.nodes[index])
                continue
            self.nodes[index] = node
            self.sizes[index] = reported
            self.infos[index] = info
            self.roster.append({"node": node, "status": "ok", **info})
        missing = sorted(set(range(self.want or 0)) - set(self.nodes))
        if missing:
            log.warning("owners without a working SuperNode (they count as vanished when sampled): %s", missing)

    # -- exchanging messages
    def _exchange(self, messages: list[tuple[int, object]]) -> dict[int, object]:
        """Send (index, message) pairs; the replies that came back without error, by index."""
        return dict(self._stream(messages))

    def _message(self, index: int, content, kind: str):
        from flwr.app import ConfigRecord, Message

        content["fedfm"] = ConfigRecord({"index": index, "state-key": self.state_key})
        # a task not picked up within the round's timeout expires at the SuperLink: a late node never trains on it
        return Message(content, dst_node_id=self.nodes[index], message_type=kind, ttl=self.timeout)

    def remember_state_key(self) -> None:
        """Keep the owners' state key in the run directory (next to the per-client state of the other engines)."""
        from fedfm.rundir import atomic_write_text

        clients = getattr(self.app, "client_states", None)
        if clients is None or self.key_kept:
            return
        path = Path(clients.dir).parent / "flower.json"
        if path.is_file():
            self.state_key = json.loads(path.read_text())["state_key"]
        elif path.parent.is_dir():  # with the owners' names: a resumed run names an owner that is down the same way
            atomic_write_text(path, json.dumps({"state_key": self.state_key,
                                                "owners": [s.name for s in self.app.client_shards]}))
        self.key_kept = path.is_file()

    def train(self, jobs: list[tuple[int, ClientTask]], downlink) -> Iterator[tuple[int, ClientUpdate | None]]:
        """Send every task, then yield (index, update or None) as the owners' replies arrive."""
        self.remember_state_key()
        if not self.cfg.secagg.enabled:  # under secure aggregation the round's keys were set up before this
            self.discover_new()
        once: dict[int, Weights] = {}

        def sent(tensors: Weights) -> Weights:
            """``tensors`` in the downlink precision, once per distinct dict; its bytes counted per receiver."""
            downlink.count(tensors)
            if id(tensors) not in once:
                once[id(tensors)] = downlink.cast(tensors)
            return once[id(tensors)]

        messages = []
        for index, task in jobs:
            weights = sent(task.weights)
            control = sent(task.config["control"]) if "control" in task.config else None
            if index not in self.nodes:
                continue  # no SuperNode serves this owner: it vanished before the round
            content = task_content(task, index, weights, control)
            self.wire_bytes["down"] += payload_bytes(content)
            messages.append((index, self._message(index, content, "train")))
        once.clear()  # the cast copies: the messages hold what they need
        answered = set()
        for index, reply in self._stream(messages):
            answered.add(index)
            yield index, self._update(index, reply)
        for index, _ in jobs:
            if index not in answered:
                yield index, None

    def _update(self, index: int, reply) -> ClientUpdate | None:
        """An owner's training reply as the server holds it, or None when it is malformed."""
        from fedfm import codec

        content = reply.content
        try:
            update, delta = update_from_content(content)
        except (KeyError, TypeError, ValueError) as exc:  # a broken node's reply: that owner is rejected
            log.warning("owner %d sent a malformed update: %r", index, exc)
            return None
        self.wire_bytes["up"] += payload_bytes(content)
        self.node_seconds.append({k: update.metrics.pop(k, None) for k in ("node_setup_s", "node_train_s")})
        # who sent it is the server's knowledge (the node it asked), never the node's own claim
        update.client = self.app.shards[index].name
        if "client_index" in update.metrics:
            update.metrics["client_index"] = index
        # bytes_up: the length of the same serialized message every engine counts
        return replace(update, delta=delta, bytes_up=len(codec.encode(delta)))

    def _stream(self, messages: list[tuple[int, object]]) -> Iterator[tuple[int, object]]:
        """Replies without error as they arrive, by federation index (:func:`stream` with the round's timeout)."""
        for index, reply in stream(self.grid, messages, self.timeout):
            if reply.has_error():
                log.warning("owner %d failed: %s", index, reply.error.reason)
                continue
            yield index, reply

    def call(self, fn: str, jobs: list[tuple[int, bytes]]) -> tuple[dict[int, bytes], int, int]:
        from flwr.app import ConfigRecord, RecordDict

        from fedfm.engines.common import check_protocol

        check_protocol(fn)
        self.remember_state_key()
        messages = [(i, self._message(i, RecordDict({"call": ConfigRecord({"fn": fn, "index": i, "payload": bytes(p)})}),
                                      "query.call")) for i, p in jobs if i in self.nodes]
        replies = {}
        for i, m in self._exchange(messages).items():
            try:
                replies[i] = bytes(m.content.config_records["reply"]["payload"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("owner %d sent a malformed protocol reply: %r", i, exc)
        return replies, sum(len(p) for _, p in jobs), sum(len(r) for r in replies.values())

    def evaluate(self, jobs: list[tuple[int, Weights]]) -> list[dict[str, float]]:
        from flwr.app import RecordDict

        messages = [(i, self._message(i, RecordDict({"weights": to_record(w)}), "evaluate")) for i, w in jobs
                    if i in self.nodes]
        replies, out = self._exchange(messages), []
        for i, _ in jobs:
            try:
                out.append(number_dict(replies[i].content.config_records["metrics"]["json"], ("loss",), finite=False)
                           if i in replies else None)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("owner %d sent a malformed evaluation: %r", i, exc)
                out.append(None)
        missing = [self.app.shards[i].name for (i, _), m in zip(jobs, out) if m is None]
        if missing:
            log.warning("no final evaluation from %s (left out of own_mean)", ", ".join(missing))
        return out


def stream(grid, messages: list[tuple[object, object]], timeout: float) -> Iterator[tuple[object, object]]:
    """Push (key, message) pairs through a ServerApp's ``grid``; yield (key, reply) for each reply as it arrives (an
    error reply included: ``reply.has_error()``), until all answered or ``timeout`` seconds passed (Flower's own
    ``send_and_receive`` waits for all and polls every 3 s). Messages to nodes no longer connected are not sent; the
    keys left without a reply are logged."""
    online = set(grid.get_node_ids())
    for key, m in messages:
        if m.metadata.dst_node_id not in online:
            log.warning("owner %s: its node %d is offline", key, m.metadata.dst_node_id)
    messages = [(k, m) for k, m in messages if m.metadata.dst_node_id in online]
    if not messages:
        return
    # message ids are assigned when the grid pushes the messages; a reply names the message it answers (an
    # error the SuperLink sends for a dead node comes from the SuperLink itself, not from the node)
    ids = list(grid.push_messages([m for _, m in messages]))
    by_id = {mid: key for mid, (key, _) in zip(ids, messages)}
    pending, deadline, wait = set(by_id), time.monotonic() + timeout, 0.05
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending)))
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            yield by_id[mid], reply
        if pending and not got:
            time.sleep(wait)
            wait = min(1.0, wait * 2)  # quick answers are picked up at once, slow rounds polled every second
        elif got:
            wait = 0.05
    for mid in sorted(pending, key=lambda m: str(by_id[m])):
        log.warning("owner %s sent no reply in time (vanished or failed)", by_id[mid])
