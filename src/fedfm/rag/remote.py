"""Federated RAG across machines on Flower: each owner's store, policy, budgets and audit log on its own node.

The owner side runs in the owner's worker (``fedfm.apps.worker``), behind the node's SuperNode: it indexes the
documents in the owner's directory (``docs.jsonl``) into a store under the node's state directory, and answers
query messages with the same :class:`fedfm.rag.owner.Owner` endpoint as the in-process federation — so what leaves
an owner, and what its audit log records, is byte for byte the same. Two things differ, both in the owner's favour:

- **the policy is the owner's**: ``owner_modes``, the guarded-release limits and the owner-side answering
  threshold come from the owner's own ``policy.json`` (written by ``fedfm rag split`` from the config, then the
  owner's to edit), never from the run's config, which the requester controls;
- **the requester is who the network says it is**: budgets are charged to the SuperLink the node is connected to
  (over TLS, checked against the federation's CA: every run reaches the owner through it), and the audit log names
  that SuperLink and the Flower run; the name a run declares is recorded beside them and moves nothing.

The requester side (:class:`FlowerRAG`) runs in a ServerApp: the same question, merge, generation and evaluation
code as :class:`fedfm.rag.federation.FederatedRAG`, with the fan-out as Flower messages. The coordinator holds no
owner documents, so there is no centralized baseline over Flower.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from fedfm.errors import DataError, FedFMError
from fedfm.rag.config import RagConfig
from fedfm.rag.federation import FanOut, FederatedRAG, group_by_owner, owner_dirname

log = logging.getLogger("fedfm")

TASK = "rag"
POLICY_KEYS = ("owner_modes", "guard", "generator.owner_min_score")


# --- owner directories --------------------------------------------------------------------------------------
def export_rag_owners(cfg: RagConfig, out: Path) -> list[Path]:
    """Write each owner of ``cfg``'s collection as an owner directory under ``out`` (new or empty): ``owner.json``,
    ``docs.jsonl`` (its documents) and ``policy.json`` (the config's owner policy, the owner's to change)."""
    from fedfm.owner import FORMAT
    from fedfm.rundir import atomic_write_text

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: choose a new directory for the owners' documents")
    groups = group_by_owner(cfg.collection.documents())
    dirs = []
    for i, (name, docs) in enumerate(groups.items()):
        d = out / owner_dirname(name)
        tmp = d.with_name(d.name + ".partial")
        tmp.mkdir(parents=True)
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / "policy.json", json.dumps(default_policy(cfg), indent=1))
        atomic_write_text(tmp / "owner.json", json.dumps({"format": FORMAT, "name": name, "index": i,
                                                          "num_clients": len(groups), "task": TASK, "label_names": []}))
        tmp.rename(d)
        dirs.append(d)
    return dirs


def default_policy(cfg: RagConfig) -> dict:
    return {"owner_modes": list(cfg.owner_modes), "guard": cfg.guard.model_dump(),
            "owner_min_score": cfg.generator.owner_min_score}


def owner_config(cfg: RagConfig, data_dir: Path) -> RagConfig:
    """The run's config with the owner's own policy in place of whatever the run asked for."""
    path = Path(data_dir) / "policy.json"
    try:
        policy = json.loads(path.read_text()) if path.is_file() else default_policy(RagConfig())
        if not isinstance(policy, dict):
            raise ValueError("not a JSON object")
        merged = cfg.model_dump()
        merged["owner_modes"] = policy.get("owner_modes", merged["owner_modes"])
        merged["guard"] = {**merged["guard"], **policy.get("guard", {})}
        merged["generator"]["owner_min_score"] = policy.get("owner_min_score", merged["generator"]["owner_min_score"])
        merged["mode"], merged["eval"]["modes"] = merged["owner_modes"][0], []  # the run's choices are not the owner's
        return RagConfig.model_validate(merged)
    except (OSError, ValueError) as exc:  # a broken policy answers nothing rather than falling back to the run's
        raise DataError(f"the owner's policy {path} is unusable: {exc}") from None


# --- the owner's node ---------------------------------------------------------------------------------------
class RagNode:
    """One owner's RAG endpoint on its own machine (kept warm in the worker for a run's config)."""

    def __init__(self, cfg: RagConfig, data_dir: Path, state_dir: Path):
        from fedfm.owner import read_owner
        from fedfm.rag.embed import Embedder

        meta = read_owner(data_dir)
        if meta["task"] != TASK:
            raise DataError(f"{data_dir} holds {meta['task']} data, not an owner's documents for RAG")
        self.name, self.data_dir = str(meta["name"]), Path(data_dir)
        self.cfg = owner_config(cfg, data_dir)
        self.root = Path(state_dir) / "rag" / "store"  # the store, its audit log and budgets: this machine only
        self.embedder = Embedder(cfg.store.encoder, cfg.store.max_length, cfg.store.batch_size)
        self._owner = None
        self._generator = None
        self._lock = threading.Lock()

    def documents(self):
        from fedfm.data.dictd import load_collection

        docs = load_collection("jsonl", self.data_dir / "docs.jsonl")
        for d in docs:
            object.__setattr__(d, "owner", self.name)  # the node's documents are its owner's, whatever a line says
        return docs

    def index(self) -> dict:
        from fedfm.rag.federation import sync_store

        with self._lock:
            t0 = time.perf_counter()
            report = sync_store(self.root, self.name, self.documents(), self.embedder, self.cfg)
            self._owner = None  # reopened on the next question
            return {**report, "seconds": round(time.perf_counter() - t0, 2)}

    def owner(self):
        from fedfm.rag.owner import Owner
        from fedfm.rag.store import OwnerStore

        if self._owner is None:
            store = OwnerStore.open(self.root)
            if store.encoder_id != self.embedder.fingerprint:
                raise FedFMError(f"{self.name}'s store was indexed with other encoder weights or token limit: run "
                                 "`fedfm rag index` again")
            self._owner = Owner(self.name, store, self.embedder, self.cfg, self)
        return self._owner

    def answer(self, question, passages):  # owner-side answering: the node's own generator, loaded on first use
        from fedfm.rag.generate import Generator

        if self._generator is None:
            g = self.cfg.generator
            self._generator = Generator(g.model, g.max_new_tokens, g.max_passage_words)
        return self._generator.answer(question, passages)

    def hello(self) -> dict:
        """Who this owner is, and its store's state (a store that cannot serve the run is reported, not fatal:
        indexing it again is how it is repaired)."""
        out = {"name": self.name, "documents": len(self.documents()), "passages": 0,
               "policy": {"owner_modes": self.cfg.owner_modes, "guard": self.cfg.guard.model_dump()}}
        if (self.root / "index").is_dir():
            try:
                out["passages"] = len(self.owner().store)
            except (DataError, FedFMError) as exc:
                out["store"] = str(exc)
        return out


class RagNodes:
    """The worker's RAG endpoint per run config (one kept, like the training App)."""

    def __init__(self):
        self.nodes: dict[str, RagNode] = {}
        self.lock = threading.Lock()

    def get(self, config: dict, data_dir: Path, state_dir: Path) -> RagNode:
        policy = Path(data_dir) / "policy.json"  # an owner's edit of its policy takes effect at the next message
        stamp = policy.stat().st_mtime_ns if policy.is_file() else None
        key = json.dumps({**{k: config[k] for k in ("store", "generator", "faults")}, "policy": stamp}, sort_keys=True)
        with self.lock:
            if key not in self.nodes:
                self.nodes.clear()
                self.nodes[key] = RagNode(RagConfig.model_validate(config), data_dir, state_dir)
            return self.nodes[key]


def answer_rag(content, rc, node, nodes: RagNodes, origin: dict):
    """The reply to a ``query.rag`` message on the owner's node: ``op`` hello, index or ask."""
    from flwr.app import ConfigRecord, RecordDict

    job = json.loads(rc.get("fedfm-rag") or "{}")
    if not job:
        raise FedFMError("the Flower run has no 'fedfm-rag' job: submit it with `fedfm rag ... --engine flower`")
    rag = nodes.get(job["config"], node.data_dir, node.state_dir)
    c = content.config_records["rag"]
    op = str(c["op"])
    if op == "hello":
        return RecordDict({"rag": ConfigRecord({"json": json.dumps(rag.hello())})})
    if op == "index":
        return RecordDict({"rag": ConfigRecord({"json": json.dumps(rag.index())})})
    if op != "ask":
        raise FedFMError(f"unknown RAG operation {op!r}")
    superlink = origin.get("superlink") or "unknown SuperLink"
    requester = {"requester": f"flower:{superlink}", "run": origin.get("run")}
    return RecordDict({"rag": ConfigRecord({"payload": rag.owner().handle(bytes(c["payload"]), requester)})})


# --- the requester (inside a ServerApp) ---------------------------------------------------------------------
class FlowerRAG(FederatedRAG):
    """:class:`FederatedRAG` whose owners are Flower nodes: questions and answers travel as Flower messages."""

    def __init__(self, cfg: RagConfig, root: Path, grid, timeout: float = 600.0):
        self.cfg, self.root, self.grid, self.timeout = cfg, Path(root), grid, timeout
        self._embedder = None
        self._generator = None
        self._generator_lock = threading.Lock()
        self._central = None
        self.nodes: dict[str, int] = {}  # owner name -> node id
        self.info: dict[str, dict] = {}  # owner name -> what its node reported
        self.unavailable: dict[str, str] = {}
        self.roster: list[dict] = []

    @property
    def embedder(self):
        """Only needed here to send questions as embeddings (query.send=embedding)."""
        from fedfm.rag.embed import Embedder

        if self._embedder is None:
            s = self.cfg.store
            self._embedder = Embedder(s.encoder, s.max_length, s.batch_size)
        return self._embedder

    @property
    def owners(self) -> dict[str, int]:
        return self.nodes

    def owner_sizes(self) -> dict[str, int]:
        return {name: int(self.info[name].get("passages", 0)) for name in self.nodes}

    def close(self) -> None:
        pass

    def _send(self, to: dict[str, int], op: str, timeout: float, payload: bytes | None = None):
        """Send ``op`` to each (key -> node id); yield (key, reply) as replies arrive (error replies included)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedfm.engines.flower_engine import stream

        rec = {"op": op} | ({"payload": payload} if payload is not None else {})
        messages = [(key, Message(RecordDict({"rag": ConfigRecord(rec)}), dst_node_id=nid, message_type="query.rag",
                                  ttl=max(timeout, 10.0))) for key, nid in to.items()]
        yield from stream(self.grid, messages, timeout)

    def connect(self, wait_s: float = 60.0, want: int | None = None) -> None:
        """Ask every connected node which owner it serves (nodes that fail are named, not fatal)."""
        deadline = time.monotonic() + wait_s
        ids = list(self.grid.get_node_ids())
        while (not ids or (want and len(ids) < want)) and time.monotonic() < deadline:
            time.sleep(1.0)
            ids = list(self.grid.get_node_ids())
        if not ids:
            raise FedFMError("no SuperNode is connected to the SuperLink: start the owners' nodes first")
        answered = set()
        for nid, reply in self._send({n: n for n in ids}, "hello", self.timeout):
            answered.add(nid)
            if reply.has_error():
                self.roster.append({"node": nid, "status": "error", "error": reply.error.reason})
                log.error("node %d cannot take part: %s", nid, reply.error.reason)
                continue
            info = json.loads(reply.content.config_records["rag"]["json"])
            name = str(info["name"])
            if name in self.nodes:
                self.roster.append({"node": nid, "status": "duplicate", **info})
                continue
            self.nodes[name], self.info[name] = nid, info
            self.roster.append({"node": nid, "status": "ok", **info})
        for nid in set(ids) - answered:
            self.roster.append({"node": nid, "status": "no reply"})
        for r in self.roster:  # named in every answer: an owner that could not say who it is is still missing
            if r["status"] in ("error", "no reply"):
                self.unavailable[f"node {r['node']}"] = f"did not say which owner it serves: {r.get('error', r['status'])}"
        self.nodes = dict(sorted(self.nodes.items()))
        if not self.nodes:
            raise FedFMError("no owner node answered: " + "; ".join(f"node {r['node']}: {r.get('error', r['status'])}"
                                                                    for r in self.roster))

    def index(self, log_line=print) -> dict:
        report = {}
        for name, reply in self._send(self.nodes, "index", self.timeout):
            if reply.has_error():
                report[name] = {"error": reply.error.reason}
                log_line(f"{name}: indexing failed: {reply.error.reason}")
                continue
            report[name] = json.loads(reply.content.config_records["rag"]["json"])
            self.info[name]["passages"] = report[name]["passages"]
            log_line(f"{name}: {report[name]['documents']} documents, {report[name]['passages']} passages "
                     f"(+{report[name]['added_docs']} / -{report[name]['removed_docs']} documents, on its node)")
        for name in set(self.nodes) - set(report):
            report[name] = {"error": "no reply"}
        return dict(sorted(report.items()))

    def fan_out(self, message: bytes) -> FanOut:
        missing, responses, received = dict(self.unavailable), {}, 0
        replied = set()
        for name, reply in self._send(self.nodes, "ask", self.cfg.query.deadline_s, message):
            replied.add(name)
            if reply.has_error():
                missing[name] = f"failed: {reply.error.reason}"
                continue
            body = bytes(reply.content.config_records["rag"]["payload"])
            received += len(body)
            self.parse_response(name, body, responses, missing)
        for name in set(self.nodes) - replied:
            missing[name] = f"did not answer within the {self.cfg.query.deadline_s:g} s deadline"
        return FanOut(dict(sorted(responses.items())), dict(sorted(missing.items())), len(message) * len(self.nodes),
                      received)

    def central_store(self):
        raise FedFMError("the coordinator holds no owner documents: there is no centralized baseline over Flower "
                         "(run `fedfm rag eval` on the embedded engine for it)")


# --- the ServerApp's job ------------------------------------------------------------------------------------
ANSWER = "fedfm-answer: "  # prefix of the answer's line in the run's log (streamed back to `fedfm rag ask`)


def serve_rag(grid, rc) -> None:
    """What the RAG ServerApp does for ``fedfm rag index|ask|eval --engine flower``: ``rc["fedfm-rag"]`` holds the
    operation, the RAG config and (ask) the question or (eval) the questions; results go to ``rc["run-dir"]`` on
    the SuperLink's machine and, for a question, to the run's log."""
    from fedfm.data.dictd import Question
    from fedfm.rag.evaluate import evaluate, to_markdown
    from fedfm.rundir import atomic_write_text

    job = json.loads(rc["fedfm-rag"])
    cfg = RagConfig.model_validate(job["config"])
    root = Path(str(rc["run-dir"]))
    root.mkdir(parents=True, exist_ok=True)
    fed = FlowerRAG(cfg, root, grid, timeout=float(job.get("timeout_s", 600.0)))
    fed.connect(float(job.get("connect_s", 60.0)), job.get("owners"))
    atomic_write_text(root / "nodes.json", json.dumps({"owners": fed.roster}, indent=1))
    op = job["op"]
    if op == "index":
        report = fed.index(log_line=lambda line: print(line, flush=True))
        atomic_write_text(root / "index.json", json.dumps(report, indent=1))
        failed = {n: r["error"] for n, r in report.items() if "error" in r}
        if failed:
            raise FedFMError(f"indexing failed at {len(failed)} owners: {failed}")
    elif op == "ask":
        ans = fed.ask(job["question"], mode=job.get("mode"), requester=job.get("requester"))
        with open(root / "answers.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(ans.to_dict(), ensure_ascii=False) + "\n")
        print(ANSWER + json.dumps(ans.to_dict(), ensure_ascii=False), flush=True)
    elif op == "eval":
        questions = [Question(q["id"], q["text"], tuple(q["doc_ids"]), tuple(q["answers"]), q["kind"])
                     for q in job["questions"]]
        result = evaluate(cfg, root, log=lambda line: print(line, flush=True), fed=fed,
                          questions=(questions, job["source"]))
        print(to_markdown(result), flush=True)
    else:
        raise FedFMError(f"unknown RAG operation {op!r}")


def rag_job(op: str, cfg: RagConfig, **extra) -> dict:
    """The ``fedfm-rag`` run config of a RAG job (for eval: the user's questions, read and checked here)."""
    job = {"op": op, "config": cfg.to_dict(), **extra}
    if op == "eval":
        from fedfm.rag.questions import read_questions

        if not cfg.eval.questions:
            raise FedFMError("over Flower the coordinator holds no documents to make questions from: give your own "
                             "with --questions FILE (eval.questions)")
        qs = read_questions(cfg.eval.questions, None)
        from fedfm.rag.evaluate import evenly

        source = {"source": "file", "path": cfg.eval.questions, "count": len(qs),
                  "with_answers": sum(1 for q in qs if q.answers)}
        job["questions"] = [{"id": q.id, "text": q.text, "doc_ids": list(q.doc_ids), "answers": list(q.answers),
                             "kind": q.kind} for q in evenly(qs, cfg.eval.max_questions)]
        job["source"] = source
    return job
