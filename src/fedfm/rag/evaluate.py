"""``fedfm rag eval``: retrieval and answer quality, latency and bytes of every mode, in one process.

Retrieval: each question is sent once to every owner (passages mode, ``max(eval.ks)`` per owner); the
same responses are merged exactly and by RRF, and the question is also searched in one centralized
index over all the documents (the baseline a federation is weighed against). Recall@k and MRR are
over documents (a document with several passages counts once, at its best rank). The questions are the
user's own (``eval.questions``, read by :mod:`fedfm.rag.questions`) or generated from the collection.

Answers (collections with known answers, e.g. the Elements): closed-book (the generator alone),
centralized RAG, and each federated privacy mode, on the same questions, with latency and bytes per
question. Results go to ``eval.json`` and ``eval.md`` in the run directory.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fedfm.data.dictd import Document, Question, questions_for
from fedfm.rag.config import RagConfig
from fedfm.rag.federation import FederatedRAG
from fedfm.rag.generate import is_correct
from fedfm.rag.merge import doc_ranking, merge_exact, merge_rrf, recall_at, reciprocal_rank
from fedfm.rag.questions import read_questions
from fedfm.rundir import atomic_write_text


def evenly(items: list, n: int | None) -> list:
    """``n`` items evenly spaced over ``items`` (all of them when ``n`` is None or large)."""
    if not n or n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def retrieval_eval(fed: FederatedRAG, questions: list[Question], ks: list[int], log=print, central: bool = True,
                   requester: str = "eval") -> dict:
    """Recall@k and MRR of the federated exact merge, RRF and (if ``central``) one centralized index."""
    kmax = max(ks)
    methods = ("centralized", "federated_exact", "federated_rrf") if central else ("federated_exact", "federated_rrf")
    rows = {m: {f"recall@{k}": [] for k in ks} | {"mrr": []} for m in methods}
    identical, seconds, sent, received, missing = 0, [], [], [], 0
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        qvec = fed.embedder.encode([q.text])[0] if fed.cfg.query.send == "embedding" else None
        out = fed.fan_out(fed.request(q.text, "passages", kmax, requester, qvec=qvec))
        lists = fed.owner_lists(out)
        exact = merge_exact(lists, kmax)
        seconds.append(time.perf_counter() - t0)
        sent.append(out.bytes_sent)
        received.append(out.bytes_received)
        missing += len(out.missing)
        rrf = merge_rrf(lists, kmax, fed.cfg.query.rrf_k)
        ranked = {"federated_exact": exact, "federated_rrf": rrf}
        if central:
            ranked["centralized"] = fed.central_retrieve(q.text, kmax, qvec=qvec)  # reuses the vector if computed
            identical += doc_ranking(exact) == doc_ranking(ranked["centralized"])
        rel = set(q.doc_ids)
        for m, hits in ranked.items():
            ranking = doc_ranking(hits)
            for k in ks:
                rows[m][f"recall@{k}"].append(recall_at(ranking, rel, k))
            rows[m]["mrr"].append(reciprocal_rank(ranking, rel))
        if (i + 1) % 50 == 0:
            log(f"retrieval: {i + 1}/{len(questions)} questions")
    table = {m: {key: float(np.mean(v)) for key, v in r.items()} for m, r in rows.items()}
    return {
        "questions": len(questions), "k_per_owner": kmax, "metrics": table,
        "exact_equals_centralized_rankings": identical if central else None,
        "federated_seconds_per_question": float(np.mean(seconds)),
        "bytes_per_question": float(np.mean(sent) + np.mean(received)),
        "owners_missing_total": missing,
    }


def answer_eval(fed: FederatedRAG, questions: list[Question], modes: list[str], log=print,
                requester: str = "eval") -> dict:
    out = {}
    for mode in modes:
        correct, secs, nbytes, used, answered, refusals, examples = [], [], [], [], [], 0, []
        for q in questions:
            if mode == "closed_book":
                ans = fed.ask_closed_book(q.text)
            elif mode == "centralized":
                ans = fed.ask_central(q.text)
            else:
                ans = fed.ask(q.text, mode=mode, requester=requester)
            ok = bool(ans.text) and is_correct(ans.text, q.answers, q.kind)
            correct.append(ok)
            secs.append(ans.seconds)
            nbytes.append(ans.bytes_sent + ans.bytes_received)
            used.append(len(ans.owners_used))
            answered.append(len(ans.owners_answered))
            refusals += sum(1 for why in ans.owners_missing.values() if why.startswith("refused"))
            if len(examples) < 3:
                examples.append({"question": q.text, "expected": list(q.answers), "answer": ans.text, "correct": ok,
                                 "citations": [f"{o}/{d}" for o, d in ans.citations]})
        out[mode] = {
            "accuracy": float(np.mean(correct)), "correct": int(np.sum(correct)), "questions": len(questions),
            "seconds_per_question": float(np.mean(secs)), "bytes_per_question": float(np.mean(nbytes)),
            "owners_used_per_question": float(np.mean(used)), "owners_answered_per_question": float(np.mean(answered)),
            "refusals": refusals, "examples": examples,
        }
        log(f"answers [{mode}]: accuracy {out[mode]['accuracy']:.3f} ({out[mode]['correct']}/{len(questions)}), "
            f"{out[mode]['seconds_per_question']:.2f} s and {out[mode]['bytes_per_question']:.0f} bytes per question")
    return out


def question_set(cfg: RagConfig, docs: list[Document]) -> tuple[list[Question], dict]:
    """The questions to evaluate on (``eval.questions``, or generated from the collection) and their source."""
    if cfg.eval.questions:
        scope = "the collection"
        if cfg.collection.max_documents:
            scope += f" (collection.max_documents={cfg.collection.max_documents} keeps {len(docs)} documents)"
        every = read_questions(cfg.eval.questions, {d.id for d in docs}, scope)
        source = {"source": "file", "path": cfg.eval.questions}
    else:
        every = questions_for(cfg.collection.name, docs)
        source = {"source": "generated from the collection", "path": None}
    source |= {"count": len(every), "with_answers": sum(1 for q in every if q.answers)}
    return evenly(every, cfg.eval.max_questions), source


def evaluate(cfg: RagConfig, root: Path, log=print, fed: FederatedRAG | None = None,
             questions: tuple[list[Question], dict] | None = None) -> dict:
    """Retrieval and answer quality of every mode (see the module docstring); writes eval.json and eval.md.

    Retrieval is scored on every question; answer accuracy on those with answers (``eval.answer_questions`` of them).
    ``questions`` (with their source): given by a coordinator that holds no documents (over Flower), which then
    has no centralized baseline either.
    """
    central = questions is None
    docs = cfg.collection.documents() if central else None
    questions, source = question_set(cfg, docs) if central else questions
    own = fed is None
    fed = fed or FederatedRAG(cfg, root)
    # a fresh requester name per evaluation: guarded budgets spent by earlier evaluations do not count here
    requester = "eval-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    modes = [m for m in cfg.eval.modes if central or m != "centralized"]
    if cfg.query.send == "embedding" and "owner_answers" in modes:
        modes.remove("owner_answers")
        log("owner_answers skipped: it needs the question text at the owners and query.send=embedding")
    try:
        t0 = time.perf_counter()
        if central:
            fed.central_store()
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "collection": cfg.collection.name if central else "the owners' own (over Flower)",
            "owners": fed.owner_sizes(), "documents": len(docs) if central else None, "send": cfg.query.send,
            "questions": source,
        }
        result["retrieval"] = retrieval_eval(fed, questions, sorted(cfg.eval.ks), log, central=central,
                                             requester=requester)
        answerable = [q for q in questions if q.answers]
        if answerable and modes:
            result["answers"] = answer_eval(fed, evenly(answerable, cfg.eval.answer_questions), modes, log, requester)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        if own:
            fed.close()
    atomic_write_text(root / "eval.json", json.dumps(result, indent=1))
    atomic_write_text(root / "eval.md", to_markdown(result))
    return result


MODE_NOTES = {
    "closed_book": "the generator alone, no documents",
    "centralized": "one index over all documents (the data pooled: what federation avoids)",
    "passages": "owners send their top passages (text, ids, scores)",
    "owner_answers": "owners answer from their own passages; only answers, confidences and cited ids leave",
    "guarded": "passages above a score threshold, capped per query, budgeted per requester, audited",
}


def _source_line(src: dict | None) -> str:
    if src is None:  # eval.json written before the question source was recorded
        return "generated from the collection"
    where = f"from {src['path']}" if src["path"] else src["source"]
    return f"{src['count']} {where} ({src['with_answers']} with answers)"


def to_markdown(r: dict) -> str:
    ret = r["retrieval"]
    keys = list(next(iter(ret["metrics"].values())))
    docs = f"{r['documents']} documents, " if r.get("documents") is not None else ""
    same = ret.get("exact_equals_centralized_rankings")
    lines = [
        f"# Federated RAG evaluation: {r['collection']} ({docs}{len(r['owners'])} owners)",
        "",
        f"- date: {r['date']}; question sent as {r['send']}",
        f"- questions: {_source_line(r.get('questions'))}",
        f"- retrieval over {ret['questions']} questions; " + (
            f"the exact merge gave the same document ranking as the centralized index for {same} of them"
            if same is not None else "no centralized index (the coordinator holds no owner documents)"),
        "",
        "| retrieval | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for m, row in ret["metrics"].items():
        lines.append(f"| {m} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    if "answers" in r:
        lines += [
            "",
            "| answers | accuracy | correct | s / question | bytes / question | owners used (answered) | what leaves an owner |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, a in r["answers"].items():
            lines.append(f"| {m} | {a['accuracy']:.3f} | {a['correct']}/{a['questions']} | {a['seconds_per_question']:.2f} | "
                         f"{a['bytes_per_question']:.0f} | {a['owners_used_per_question']:.1f} ({a.get('owners_answered_per_question', 0):.1f}) | "
                         f"{MODE_NOTES[m]} |")
    return "\n".join(lines) + "\n"
