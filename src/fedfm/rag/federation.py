"""The server side of federated RAG: index the owners' stores, send a question out, merge, answer.

Owners run in-process here (the embedded engine's way: one embedder and one generator in memory,
each owner's store in its own directory); every exchange is a byte message through
:meth:`fedfm.rag.owner.Owner.handle`, so the bytes per question are real message sizes. Owners answer
concurrently; those that have not answered by ``query.deadline_s`` are left out and named in the
answer, as are owners that refuse (budget) or fail.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedfm.data.dictd import Document, chunk_document
from fedfm.errors import DataError, FedFMError
from fedfm.rag.config import RagConfig
from fedfm.rag.embed import Embedder
from fedfm.rag.generate import Generator, Passage, normalise_answer
from fedfm.rag.merge import OwnedHit, merge_exact, merge_rrf
from fedfm.rag.owner import Owner, encode_vector
from fedfm.rag.store import OwnerStore
from fedfm.rundir import atomic_write_text


def owner_dirname(owner: str) -> str:
    """A file-system-safe directory name for an owner ("operating system" -> "operating-system")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", owner).strip("-") or "owner"


def group_by_owner(docs: list[Document]) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {}
    for d in docs:
        out.setdefault(d.owner, []).append(d)
    return dict(sorted(out.items()))


def sync_store(root: Path, name: str, docs: list[Document], embedder: Embedder, cfg: RagConfig) -> dict:
    """Bring the store at ``root`` in line with ``docs``: add new or changed documents, remove gone ones.

    A store built with other encoder weights, token limit or chunking is rebuilt from scratch (its chunk
    ids continue where the old store's stopped). Returns counts.
    """
    s = cfg.store
    store = OwnerStore.open(root) if OwnerStore.exists(root) else None
    same = store is not None and (store.encoder_id, store.chunk_words, store.chunk_overlap) == (
        embedder.fingerprint, s.chunk_words, s.chunk_overlap)
    rebuilt = store is not None and not same
    if not same:
        store = OwnerStore(root, s.encoder, embedder.dim, s.chunk_words, s.chunk_overlap, embedder.fingerprint,
                           next_id=store.next_id if store is not None else 0)
    have: dict[str, list[str]] = {}
    for cid in sorted(store.chunks):
        doc, text = store.chunks[cid]
        have.setdefault(doc, []).append(text)
    wanted = {d.id: d for d in docs}
    gone = sorted(set(have) - set(wanted))
    changed = [d for d in docs if d.id not in have or have[d.id] != chunk_document(d, s.chunk_words, s.chunk_overlap)]
    removed = store.remove(gone)
    added = store.add(changed, embedder)
    if removed or added or rebuilt or not OwnerStore.exists(root):
        store.save()
    atomic_write_text(root / "owner.json", json.dumps({"name": name}))
    return {"documents": len(wanted), "passages": len(store), "added_docs": len(changed),
            "removed_docs": len(gone), "rebuilt": rebuilt}


def index(cfg: RagConfig, root: Path, central: bool = False, log=print) -> dict:
    """Build or update every owner's store under ``root/owners`` (and ``root/central`` if asked)."""
    docs = cfg.collection.documents()
    embedder = Embedder(cfg.store.encoder, cfg.store.max_length, cfg.store.batch_size)
    report = {}
    groups = group_by_owner(docs)
    dirname = {owner: owner_dirname(owner) for owner in groups}  # owner -> its directory under owners/
    taken: dict[str, str] = {}
    for owner, d in dirname.items():  # two owners in one store would silently merge (and drop each other's documents)
        if d in (".", ".."):
            raise DataError(f"owner name {owner!r} cannot name a directory; rename the owner")
        if d in taken:
            raise DataError(f"owners {taken[d]!r} and {owner!r} map to the same directory {d!r}; rename one of them")
        taken[d] = owner
    for owner, owned in groups.items():
        t0 = time.perf_counter()
        report[owner] = sync_store(root / "owners" / dirname[owner], owner, owned, embedder, cfg)
        report[owner]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{owner}: {report[owner]['documents']} documents, {report[owner]['passages']} passages "
            f"(+{report[owner]['added_docs']} / -{report[owner]['removed_docs']} documents)")
    known = set(dirname.values())
    for d in sorted((root / "owners").iterdir()) if (root / "owners").is_dir() else []:
        if d.is_dir() and d.name not in known:
            log(f"note: {d} holds an owner no longer in the collection; it is not queried")
    # the federation's membership: exactly these owners are queried, and any of them whose store cannot
    # be opened is named in every answer rather than silently skipped
    atomic_write_text(root / "owners.json", json.dumps(dirname, indent=1))
    if central:
        report["(central)"] = sync_store(root / "central", "central", docs, embedder, cfg)
    return report


def _owner_name(root: Path) -> str:
    try:
        return str(json.loads((root / "owner.json").read_text())["name"])
    except (OSError, ValueError, KeyError):
        return root.name


class _SharedGenerator:
    """The owners of a simulated federation share the process's generator, loaded on first use."""

    def __init__(self, fed: FederatedRAG):
        self.fed = fed

    def answer(self, question, passages):
        return self.fed.generator.answer(question, passages)


@dataclass
class Answer:
    """The server's answer to one question, with what it cost and which owners it used."""

    question: str
    mode: str
    text: str | None
    citations: list[tuple[str, str]]  # (owner, document), in the order given to the generator
    owners_used: list[str]  # owners whose passages (or answer) the answer rests on
    owners_missing: dict[str, str] = field(default_factory=dict)  # owner -> why it is not in the answer
    owners_answered: list[str] = field(default_factory=list)  # owners that replied in time (used or not)
    hits: list[OwnedHit] = field(default_factory=list)
    confidence: float | None = None
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict:
        return {
            "question": self.question, "mode": self.mode, "answer": self.text,
            "citations": [{"owner": o, "document": d} for o, d in self.citations],
            "owners_used": self.owners_used, "owners_answered": self.owners_answered,
            "owners_missing": self.owners_missing,
            "confidence": self.confidence, "seconds": round(self.seconds, 4),
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }


@dataclass
class FanOut:
    """Every owner's parsed response to one request, and what the exchange cost."""

    responses: dict[str, dict]
    missing: dict[str, str]
    bytes_sent: int
    bytes_received: int


class FederatedRAG:
    """Open the owners' stores of an indexed run and answer questions across them."""

    def __init__(self, cfg: RagConfig, root: Path, embedder: Embedder | None = None, generator: Generator | None = None):
        self.cfg, self.root = cfg, Path(root)
        owners_dir = self.root / "owners"
        members_file = self.root / "owners.json"
        if members_file.is_file():
            members = json.loads(members_file.read_text())
        else:  # a run indexed before membership files existed: every store under owners/
            members = ({d.name: d.name for d in sorted(owners_dir.iterdir()) if OwnerStore.exists(d)}
                       if owners_dir.is_dir() else {})
        self.embedder = embedder or Embedder(cfg.store.encoder, cfg.store.max_length, cfg.store.batch_size)
        self._generator = generator
        self._generator_lock = threading.Lock()
        shared = _SharedGenerator(self)
        self.owners: dict[str, Owner] = {}
        self.unavailable: dict[str, str] = {}  # member -> why it cannot be asked
        for name, dirname in sorted(members.items()):
            root_o = owners_dir / dirname
            try:
                st = OwnerStore.open(root_o)
            except DataError as exc:
                self.unavailable[name] = f"store unavailable: {exc}"
                continue
            if st.encoder_id != self.embedder.fingerprint:
                raise FedFMError(f"store {st.root} was indexed with other encoder weights or token limit than "
                                 f"{cfg.store.encoder!r} (max_length {cfg.store.max_length}): run `fedfm rag index` again")
            oname = name if members_file.is_file() else _owner_name(root_o)
            self.owners[oname] = Owner(oname, st, self.embedder, cfg, shared)
        if not self.owners:
            raise FedFMError(f"no owner stores in {owners_dir}: run `fedfm rag index` first")
        self._inflight: dict[str, object] = {}  # owner -> its unfinished request (a late owner gets no new ones)
        self._pool = ThreadPoolExecutor(max_workers=len(self.owners), thread_name_prefix="owner")
        self._central: OwnerStore | None = None

    @property
    def generator(self) -> Generator:
        # owners' threads may ask for it at once: load it once (transformers' loading is not thread-safe)
        with self._generator_lock:
            if self._generator is None:
                g = self.cfg.generator
                self._generator = Generator(g.model, g.max_new_tokens, g.max_passage_words)
        return self._generator

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the fan-out
    def request(self, question: str, mode: str, k: int, requester: str, qvec: np.ndarray | None = None) -> bytes:
        msg = {"v": 1, "qid": uuid.uuid4().hex[:12], "requester": requester, "mode": mode, "k": k}
        if self.cfg.query.send == "embedding" and mode != "owner_answers":
            msg["embedding"] = encode_vector(self.embedder.encode([question])[0] if qvec is None else qvec)
        else:
            msg["text"] = question
        return json.dumps(msg).encode()

    def fan_out(self, message: bytes) -> FanOut:
        missing = dict(self.unavailable)
        futures = {}
        for name, owner in self.owners.items():
            prev = self._inflight.get(name)
            if prev is not None and not prev.done():  # still on an earlier question: do not queue behind it
                missing[name] = "still busy with an earlier question it did not answer in time"
                continue
            fut = self._pool.submit(owner.handle, message)
            self._inflight[name] = fut
            futures[fut] = name
        done, late = wait(futures, timeout=self.cfg.query.deadline_s)
        responses, received = {}, 0
        for fut in done:
            name = futures[fut]
            try:
                body = fut.result()
            except Exception as exc:  # noqa: BLE001  (an owner's failure must not sink the question)
                missing[name] = f"failed: {type(exc).__name__}: {exc}"
                continue
            received += len(body)
            self.parse_response(name, body, responses, missing)
        for fut in late:
            missing[futures[fut]] = f"did not answer within the {self.cfg.query.deadline_s:g} s deadline"
        return FanOut(dict(sorted(responses.items())), dict(sorted(missing.items())), len(message) * len(futures), received)

    @staticmethod
    def parse_response(name: str, body: bytes, responses: dict, missing: dict) -> None:
        """File an owner's response under ``responses``, or its refusal, error or garbage under ``missing``."""
        try:
            resp = json.loads(body)
            if not isinstance(resp, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            missing[name] = "sent a malformed response"
            return
        if "refused" in resp:
            missing[name] = f"refused: {resp['refused']}"
        elif "error" in resp:
            missing[name] = f"error: {resp['error']}"
        else:
            responses[name] = resp

    def owner_sizes(self) -> dict[str, int]:
        """Passages in each owner's store."""
        return {n: len(o.store) for n, o in self.owners.items()}

    @staticmethod
    def owner_lists(out: FanOut) -> dict[str, list[OwnedHit]]:
        return {name: [OwnedHit(name, h["doc"], int(h["chunk"]), float(h["score"]), h.get("text"))
                       for h in resp.get("hits", [])] for name, resp in out.responses.items()}

    def retrieve(self, question: str, k: int | None = None, mode: str = "passages", requester: str | None = None,
                 merge: str | None = None) -> tuple[list[OwnedHit], FanOut]:
        k = k or self.cfg.query.k
        per_owner = max(k, self.cfg.query.per_owner_k or k)
        out = self.fan_out(self.request(question, mode, per_owner, requester or self.cfg.requester))
        lists = self.owner_lists(out)
        if (merge or self.cfg.query.merge) == "rrf":
            return merge_rrf(lists, k, self.cfg.query.rrf_k), out
        return merge_exact(lists, k), out

    # ------------------------------------------------------------------ answering
    def ask(self, question: str, mode: str | None = None, requester: str | None = None) -> Answer:
        mode = mode or self.cfg.mode
        if mode == "owner_answers" and self.cfg.query.send == "embedding":
            raise FedFMError("owner-side answering needs the question text at the owners, but query.send=embedding "
                             "promises they never see it: use --mode passages or guarded, or set query.send=text")
        if mode == "owner_answers":
            _ = self.generator  # load it here, not inside an owner's thread while the deadline runs
        t0 = time.perf_counter()
        if mode == "owner_answers":
            out = self.fan_out(self.request(question, mode, self.cfg.query.per_owner_k or self.cfg.query.k,
                                            requester or self.cfg.requester))
            ans = self._vote(question, out, self.cfg.generator.vote)
        else:
            hits, out = self.retrieve(question, mode=mode, requester=requester)
            ans = self._generate(question, mode, hits)
        ans.owners_answered = sorted(out.responses)
        if mode != "owner_answers":  # owners whose passages reached the generator
            ans.owners_used = sorted({o for o, _ in ans.citations})
        ans.owners_missing = out.missing
        ans.bytes_sent, ans.bytes_received = out.bytes_sent, out.bytes_received
        ans.seconds = time.perf_counter() - t0
        return ans

    def _generate(self, question: str, mode: str, hits: list[OwnedHit]) -> Answer:
        ctx = hits[: self.cfg.generator.context_passages]
        if not ctx:  # nothing was released: say so rather than let the generator answer from its weights
            return Answer(question, mode, None, [], [], hits=[], confidence=0.0)
        gen = self.generator.answer(question, [Passage(h.owner, h.doc, h.text or "", h.score) for h in ctx])
        return Answer(question, mode, gen.text, [(h.owner, h.doc) for h in ctx], [], hits=hits,
                      confidence=gen.confidence)

    @staticmethod
    def _vote(question: str, out: FanOut, vote: str = "max") -> Answer:
        """Owner-side answering: answers grouped after normalisation; the group with the most confident
        owner (``max``) or the largest summed confidence (``sum``) wins, ties to the owner name first in
        order; the documents of the owners in that group are the citations."""
        groups: dict[str, list[tuple[str, dict]]] = {}
        for name, resp in out.responses.items():
            if resp.get("answer"):
                groups.setdefault(normalise_answer(resp["answer"]), []).append((name, resp))
        if not groups:
            return Answer(question, "owner_answers", None, [], [], confidence=0.0)
        pool = max if vote == "max" else sum
        best = min(groups.values(), key=lambda g: (-pool(r["confidence"] for _, r in g), g[0][0]))
        top = max(best, key=lambda nr: nr[1]["confidence"])
        cites = [(name, doc) for name, r in best for doc in r.get("docs", [])]
        return Answer(question, "owner_answers", top[1]["answer"], cites, sorted(name for name, _ in best),
                      confidence=round(pool(r["confidence"] for _, r in best), 6))

    # ------------------------------------------------------------------ baselines in the same process
    def central_store(self) -> OwnerStore:
        """One index over every owner's documents (the centralized baseline), built on first use."""
        if self._central is None:
            root = self.root / "central"
            docs = self.cfg.collection.documents()
            sync_store(root, "central", docs, self.embedder, self.cfg)
            self._central = OwnerStore.open(root)
            # who holds each document, to label the central baseline's hits like the federation's
            self._owner_of = {doc: name for name, o in self.owners.items() for doc in o.store.doc_ids()}
        return self._central

    def central_retrieve(self, question: str, k: int, qvec: np.ndarray | None = None) -> list[OwnedHit]:
        store = self.central_store()  # also fills self._owner_of
        q = self.embedder.encode([question])[0] if qvec is None else qvec
        owner_of = self._owner_of
        return [OwnedHit(owner_of.get(h.doc, "central"), h.doc, h.chunk, h.score, h.text) for h in store.search(q, k)]

    def ask_central(self, question: str) -> Answer:
        t0 = time.perf_counter()
        hits = self.central_retrieve(question, self.cfg.query.k)
        ans = self._generate(question, "centralized", hits)  # no owner is asked: the data sit in one index
        ans.seconds = time.perf_counter() - t0
        return ans

    def ask_closed_book(self, question: str) -> Answer:
        t0 = time.perf_counter()
        gen = self.generator.answer(question, [])
        return Answer(question, "closed_book", gen.text, [], [], confidence=gen.confidence,
                      seconds=time.perf_counter() - t0)
