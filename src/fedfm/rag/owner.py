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
released. Each line carries the SHA-256 of the previous line, and ``audit.head.json`` holds the line
count and the last line's hash, so a deleted, edited or cut-off line is detected
(:func:`verify_audit_log`). Appends and budget updates take file locks, so several processes may
serve one owner directory. If the log cannot be written, nothing is released.

Requester names are whatever the caller declares in the in-process federation, where nothing
authenticates them, so a budget there limits an honest or identified requester. Over Flower
(``fedfm.rag.remote``) the owner's node sets the requester itself, from the authenticated connection.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedfm.rag.generate import Passage
from fedfm.rag.store import OwnerStore
from fedfm.rundir import atomic_write_text

MODES = ("passages", "owner_answers", "guarded")
MAX_K = 1000  # passages one query may ask of an owner (the server asks at most 100)


def encode_vector(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str, dim: int) -> np.ndarray:
    raw = base64.b64decode(s.encode("ascii"), validate=True)
    if len(raw) != 4 * dim:
        raise ValueError(f"embedding has {len(raw) // 4} values, the store needs {dim}")
    v = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(v).all():
        raise ValueError("embedding holds NaN or Inf")
    # scores are cosines only for a unit query: a scaled one would lift every score past guard.min_score (and a
    # negated one would fetch the least similar passages)
    norm = float(np.linalg.norm(v))
    if abs(norm - 1.0) > 1e-3:
        raise ValueError(f"embedding must have unit L2 norm (it has {norm:.4g})")
    return v


class Owner:
    """One owner's query endpoint over its :class:`OwnerStore` (thread-safe: one query at a time)."""

    def __init__(self, name: str, store: OwnerStore, embedder, cfg, generator=None):
        self.name, self.store, self.embedder, self.cfg, self.generator = name, store, embedder, cfg, generator
        self.root = store.root
        self._lock = threading.Lock()
        self._delay = float(cfg.faults.slow_owners.get(name, 0.0))

    # ------------------------------------------------------------------ budget and audit
    @property
    def audit_path(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def head_path(self) -> Path:
        return self.root / "audit.head.json"

    @contextmanager
    def _locked(self, path: Path):
        """An exclusive lock on ``path`` (created if missing), across threads and processes."""
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _charge(self, requester: str) -> str | None:
        """Count one guarded query against ``requester``'s budget; the reason to refuse, or None.

        Fails closed: a budget file that cannot be read refuses every query until it is repaired.
        """
        p = self.root / "budget.json"
        with self._locked(self.root / "budget.lock"):
            try:
                budget = json.loads(p.read_text()) if p.is_file() else {}
                if not isinstance(budget, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                return f"the owner's budget file {p.name} is unreadable ({exc}); queries are refused until it is repaired"
            used = int(budget.get(requester, 0))
            if used >= self.cfg.guard.budget:
                return f"query budget of {self.cfg.guard.budget} exhausted for requester {requester!r}"
            budget[requester] = used + 1
            atomic_write_text(p, json.dumps(budget))
        return None

    def _audit(self, request: dict, payload: dict, nbytes: int) -> None:
        """Append one record under a file lock; the head file (line count, last hash) is the chain's anchor."""
        query = request.get("text")
        if "embedding" in request:  # what is searched is the embedding, whatever text came with it
            query = "embedding sha256:" + hashlib.sha256(str(request["embedding"]).encode()).hexdigest()
        with self._locked(self.audit_path) as fh:
            lines, prev = read_head(self.root)
            tail = _last_line(fh)
            if tail is not None and hashlib.sha256(tail).hexdigest() != prev:
                try:
                    last = json.loads(tail)
                except ValueError:
                    last = None
                if not isinstance(last, dict) or last.get("prev") != prev:  # not a lost head update: refuse
                    raise OSError(f"{self.audit_path} does not end where its head says; check it with verify_audit_log")
                # a writer died after appending its line and before updating the head: roll the head forward
                lines, prev = lines + 1, hashlib.sha256(tail).hexdigest()
            record = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "requester": request.get("requester"), "qid": request.get("qid"), "mode": request.get("mode"),
                "query": query, "bytes": nbytes, "released": payload, "prev": prev,
            }
            record.update({k: request[k] for k in ("run", "declared_requester") if k in request})
            line = json.dumps(record, ensure_ascii=False, sort_keys=True)
            fh.write((line + "\n").encode())  # append-only ("a" mode)
            fh.flush()
            os.fsync(fh.fileno())
            atomic_write_text(self.head_path, json.dumps({"lines": lines + 1, "last": hashlib.sha256(line.encode()).hexdigest()}))

    # ------------------------------------------------------------------ the endpoint
    def handle(self, message: bytes, origin: dict | None = None) -> bytes:
        """Answer one query message; returns the response bytes (also what the audit log records).

        ``origin``: who the network says sent it (over Flower: the SuperLink and the run). Its ``requester`` replaces
        the one the message declares, which the audit log keeps as ``declared_requester``."""
        with self._lock:
            if self._delay:
                time.sleep(self._delay)  # simulated slow owner (faults.slow_owners)
            request: dict = {}
            try:
                parsed = json.loads(message)
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
                request = parsed
                if origin:
                    request = {**request, **origin, "declared_requester": request.get("requester")}
                payload = self._answer(request)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                payload = {"owner": self.name, "qid": request.get("qid"), "error": f"malformed query: {exc}"}
            body = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
            self._audit(request, payload, len(body))
            return body

    def _query_vector(self, request: dict) -> np.ndarray:
        if "embedding" in request:
            if "text" in request:  # the audit log must record what was searched, not a decoy text
                raise ValueError("send the query as text or as an embedding, not both")
            return decode_vector(request["embedding"], self.store.dim)
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a query needs non-empty text or an embedding")
        return self.embedder.encode([text])[0]

    def _answer(self, request: dict) -> dict:
        mode = request.get("mode")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode not in self.cfg.owner_modes:  # the owner's policy decides what may leave, not the request
            raise ValueError(f"this owner does not answer mode {mode!r} (it answers {', '.join(self.cfg.owner_modes)})")
        k = request.get("k", 5)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}")
        out = {"owner": self.name, "qid": request.get("qid")}
        requester = str(request.get("requester", "anonymous"))
        qvec = self._query_vector(request)  # a malformed query is refused before it costs any budget
        if mode == "guarded":
            refusal = self._charge(requester)
            if refusal:
                return {**out, "refused": refusal}
            k = min(k, self.cfg.guard.max_k)
        hits = self.store.search(qvec, k)
        if mode == "guarded":
            hits = [h for h in hits if h.score >= self.cfg.guard.min_score]
        if mode in ("passages", "guarded"):
            return {**out, "hits": [{"doc": h.doc, "chunk": h.chunk, "score": h.score, "text": h.text}
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


def _last_line(fh) -> bytes | None:
    """The last non-empty line of an open binary file (read backwards in blocks), without its newline."""
    fh.seek(0, os.SEEK_END)
    end = pos = fh.tell()
    buf = b""
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        lines = buf.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            last = lines[-1].strip()
            fh.seek(end)
            return last or None
    return None


def read_head(root: Path) -> tuple[int, str]:
    """(line count, SHA-256 of the last line) of an owner's audit log, from its head file.

    A log written before head files existed is scanned once instead.
    """
    head, log = Path(root) / "audit.head.json", Path(root) / "audit.jsonl"
    if head.is_file():
        h = json.loads(head.read_text())
        return int(h["lines"]), str(h["last"])
    lines, last = 0, ""
    if log.is_file():
        with open(log, "rb") as fh:
            for line in fh:
                if line.strip():
                    lines, last = lines + 1, hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    return lines, last


def verify_audit_log(path: Path) -> int:
    """Check an owner's audit log: each line's ``prev`` is the SHA-256 of the line before (an edited or removed
    line breaks the chain), and the head file's count and last hash match the end (a cut-off tail or an edited
    last line is caught). Returns the number of lines; raises ValueError.

    The head is kept beside the log at the owner; an owner that rewrites both can still fake history, so a
    requester who needs proof keeps the head values it was shown.
    """
    path = Path(path)
    prev = ""
    n = 0
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            record = json.loads(line)
            if record.get("prev") != prev:
                raise ValueError(f"{path}: line {n} does not follow line {n - 1} (edited or removed lines)")
            prev = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    head = path.parent / "audit.head.json"
    if head.is_file():
        h = json.loads(head.read_text())
        if int(h["lines"]) != n or h["last"] != prev:
            raise ValueError(f"{path}: ends at line {n} but its head records {h['lines']} lines (cut or edited tail)")
    return n
