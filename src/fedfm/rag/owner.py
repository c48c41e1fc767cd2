"""A data owner in federated RAG: it answers query messages (bytes in, bytes out) from its own store.

What leaves the owner, per mode (each response is exactly the bytes returned by :meth:`Owner.handle`):

- ``passages`` (trusted federation): its top-k passages with their text, document ids and scores.
- ``owner_answers``: the owner generates an answer from its own passages; only the answer text, a
  confidence and the ids of the documents it used (for citation) leave. Passage text stays home.
  An owner whose best passage scores below ``generator.owner_min_score`` abstains.
- ``guarded``: passages as in ``passages`` but only those scoring at least ``guard.min_score``, at
  most ``guard.max_k`` of them, and only while the requester is within its query budget.

In every mode the owner appends to ``audit.jsonl`` in its own directory, *before* replying, one line
with the time, the requester, the query (text, or a hash of the embedding) and the exact payload
released. Each line carries the SHA-256 of the previous line, so a deleted or edited line breaks
the chain (:func:`verify_audit_log`). If the log cannot be written, nothing is released.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedfm.rag.generate import Passage
from fedfm.rag.store import OwnerStore
from fedfm.rundir import atomic_write_text

MODES = ("passages", "owner_answers", "guarded")


def encode_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str, dim: int) -> np.ndarray:
    raw = base64.b64decode(s.encode("ascii"), validate=True)
    if len(raw) != 4 * dim:
        raise ValueError(f"embedding has {len(raw) // 4} values, the store needs {dim}")
    v = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(v).all():
        raise ValueError("embedding holds NaN or Inf")
    return v


class Owner:
    """One owner's query endpoint over its :class:`OwnerStore` (thread-safe: one query at a time)."""

    def __init__(self, name: str, store: OwnerStore, embedder, cfg, generator=None):
        self.name, self.store, self.embedder, self.cfg, self.generator = name, store, embedder, cfg, generator
        self.root = store.root
        self._lock = threading.Lock()
        self._delay = float(cfg.faults.slow_owners.get(name, 0.0))
        self._prev: str | None = None

    # ------------------------------------------------------------------ budget and audit
    @property
    def audit_path(self) -> Path:
        return self.root / "audit.jsonl"

    def _budget(self) -> dict[str, int]:
        p = self.root / "budget.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _last_hash(self) -> str:
        """SHA-256 of the log's last line (read once, then kept up to date by :meth:`_audit`)."""
        if self._prev is None:
            self._prev = ""
            if self.audit_path.is_file():
                with open(self.audit_path, "rb") as fh:
                    for line in fh:
                        if line.strip():
                            self._prev = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
        return self._prev

    def _audit(self, request: dict, payload: dict, nbytes: int) -> None:
        query = request.get("text")
        if query is None and "embedding" in request:
            query = "embedding sha256:" + hashlib.sha256(request["embedding"].encode()).hexdigest()
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "requester": request.get("requester"), "qid": request.get("qid"), "mode": request.get("mode"),
            "query": query, "bytes": nbytes, "released": payload, "prev": self._last_hash(),
        }
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        with open(self.audit_path, "a", encoding="utf-8") as fh:  # append-only
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._prev = hashlib.sha256(line.encode()).hexdigest()

    # ------------------------------------------------------------------ the endpoint
    def handle(self, message: bytes) -> bytes:
        """Answer one query message; returns the response bytes (also what the audit log records)."""
        with self._lock:
            if self._delay:
                time.sleep(self._delay)  # simulated slow owner (faults.slow_owners)
            request: dict = {}
            try:
                parsed = json.loads(message)
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
                request = parsed
                payload = self._answer(request)
            except (ValueError, KeyError, TypeError) as exc:
                payload = {"owner": self.name, "qid": request.get("qid"), "error": f"malformed query: {exc}"}
            body = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
            self._audit(request, payload, len(body))
            return body

    def _query_vector(self, request: dict) -> np.ndarray:
        if "embedding" in request:
            return decode_vector(request["embedding"], self.store.dim)
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a query needs non-empty text or an embedding")
        return self.embedder.encode([text])[0]

    def _answer(self, request: dict) -> dict:
        mode = request.get("mode")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        k = int(request.get("k", 5))
        if k < 1:
            raise ValueError("k must be at least 1")
        out = {"owner": self.name, "qid": request.get("qid")}
        requester = str(request.get("requester", "anonymous"))
        if mode == "guarded":
            budget = self._budget()
            used = budget.get(requester, 0)
            if used >= self.cfg.guard.budget:
                return {**out, "refused": f"query budget of {self.cfg.guard.budget} exhausted for requester {requester!r}"}
            budget[requester] = used + 1
            atomic_write_text(self.root / "budget.json", json.dumps(budget))
            k = min(k, self.cfg.guard.max_k)
        hits = self.store.search(self._query_vector(request), k)
        if mode == "guarded":
            hits = [h for h in hits if h.score >= self.cfg.guard.min_score]
        if mode in ("passages", "guarded"):
            return {**out, "hits": [{"doc": h.doc, "chunk": h.chunk, "score": round(h.score, 6), "text": h.text}
                                    for h in hits]}
        # owner-side answering: only an answer, its confidence and the cited document ids leave
        if self.generator is None:
            raise ValueError("this owner has no generator: owner-side answering is off")
        if not hits or hits[0].score < self.cfg.generator.owner_min_score:
            return {**out, "answer": None, "confidence": 0.0, "docs": []}
        used = hits[: self.cfg.generator.context_passages]
        gen = self.generator.answer(request["text"], [Passage(self.name, h.doc, h.text, h.score) for h in used])
        # confidence: the generator's own (token probability) times how well the owner's best passage matched
        return {**out, "answer": gen.text, "confidence": round(gen.confidence * max(0.0, hits[0].score), 6),
                "docs": list(dict.fromkeys(h.doc for h in used))}


def verify_audit_log(path: Path) -> int:
    """Check the hash chain of an owner's audit log; returns the number of lines, raises ValueError."""
    prev = ""
    n = 0
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            record = json.loads(line)
            if record.get("prev") != prev:
                raise ValueError(f"{path}: line {n} does not follow line {n - 1} (edited or removed lines)")
            prev = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    return n
