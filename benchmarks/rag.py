"""Federated RAG benchmark (issue 5): retrieval, answers, latency and bytes per mode, retriever training.

    python benchmarks/rag.py                     # all three parts (about 40 minutes alone on 2 cores)
    python benchmarks/rag.py --parts elements    # Elements: retrieval + answers for every mode
    python benchmarks/rag.py --parts foldoc      # FOLDOC: retrieval, exact vs RRF vs centralized
    python benchmarks/rag.py --parts retriever   # federated retriever training, re-index, held-out recall@5
    python benchmarks/rag.py --quick --out /tmp/rag   # every part on a sliver (tests): see QUICK

Parts:
- elements: configs/rag_elements.yaml. Recall@k/MRR of the federated exact merge, RRF and one centralized
  index on all 236 questions; answer accuracy of closed-book, centralized RAG and the three federated
  modes on the same questions, with seconds and bytes per question; the question sent as text and as
  an embedding.
- foldoc: configs/rag_foldoc.yaml (3,000 of FOLDOC's 12k definitions, 9 owners), retrieval on 1,000 questions.
- retriever: `fedfm run configs/rag_retriever_foldoc.yaml` (federated contrastive training of MiniLM on
  the owners' (question, passage) pairs of a 3,000-entry FOLDOC sample), then every owner re-indexes its
  entries with the trained encoder; recall@5 of the held-out questions (their pairs were in no client's
  training data) over the whole federated collection, before and after (the question goes out as an
  embedding: computed once by the server instead of by each of the 9 owners).

Writes benchmarks/results/rag.md and rag.json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import add_quick_args, result_header, results_dir

from fedfm import config as run_config
from fedfm.rag import config as rag_config
from fedfm.rag.evaluate import evaluate, retrieval_eval, to_markdown
from fedfm.rag.federation import FederatedRAG, index

# --quick overrides of each part: a few documents, questions and answers, one training round
QUICK = {
    "elements": ["collection.max_documents=24", "eval.max_questions=6", "eval.answer_questions=1",
                 "generator.max_new_tokens=4"],
    "foldoc": ["collection.max_documents=50", "eval.max_questions=10"],
    "retriever": ["rounds=1", "data.max_examples=60", "train.local_steps=1", "train.batch_size=8", "eval.max_examples=16"],
}


def part_elements(tmp: Path, log, extra: list[str]) -> dict:
    out = {}
    for send in ("text", "embedding"):
        modes = "[closed_book, centralized, passages, owner_answers, guarded]" if send == "text" else "[]"
        cfg = rag_config.load("configs/rag_elements.yaml", [f"output_dir={tmp}", f"name=elements-{send}",
                                                           f"query.send={send}", f"eval.modes={modes}", *extra])
        t0 = time.perf_counter()
        index(cfg, cfg.run_dir, log=lambda *_: None)
        t_index = time.perf_counter() - t0
        r = evaluate(cfg, cfg.run_dir, log=log)
        r["index_seconds"] = round(t_index, 1)
        out[send] = r
        log(to_markdown(r))
    return out


def part_foldoc(tmp: Path, log, extra: list[str]) -> dict:
    cfg = rag_config.load("configs/rag_foldoc.yaml", [f"output_dir={tmp}", "name=foldoc", *extra])
    t0 = time.perf_counter()
    index(cfg, cfg.run_dir, log=log)
    t_index = time.perf_counter() - t0
    r = evaluate(cfg, cfg.run_dir, log=log)
    r["index_seconds"] = round(t_index, 1)
    log(to_markdown(r))
    return r


def part_retriever(tmp: Path, log, extra: list[str]) -> dict:
    from fedfm import server
    from fedfm.app import App
    from fedfm.data.dictd import foldoc_questions, load_collection

    train_cfg = run_config.load("configs/rag_retriever_foldoc.yaml", [f"output_dir={tmp}", *extra])
    t0 = time.perf_counter()
    run_dir = server.run(train_cfg, "federated", tmp / "retriever-run")
    train_seconds = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    # the federation's collection is the training run's sample of FOLDOC; the held-out questions are its
    # global test split (their pairs were in no client's training data)
    app = App(train_cfg)
    sampled, held_out = set(app.dataset.texts), {app.dataset.texts[i] for i in app.split.global_test}
    del app
    docs = load_collection("foldoc", max_owners=train_cfg.data.owner_count)
    kept = [(d, q) for d, q in zip(docs, foldoc_questions(docs)) if q.text in sampled]
    collection = tmp / "foldoc-sample.jsonl"
    with open(collection, "w", encoding="utf-8") as fh:
        for d, _ in kept:
            fh.write(json.dumps({"id": d.id, "title": d.title, "text": d.text, "owner": d.owner}) + "\n")
    questions = [q for _, q in kept if q.text in held_out]
    res = {"train_seconds": round(train_seconds, 1), "documents": len(kept),
           "train_summary": {k: summary.get(k) for k in ("global", "bytes_total", "rounds", "trainable_params")}}
    for name, encoder in (("base MiniLM", "minilm"), ("federated-trained", str(run_dir / "final"))):
        cfg = rag_config.load("configs/rag_foldoc.yaml", [
            f"output_dir={tmp}", f"name=retriever-{len(res)}", "collection.name=jsonl", f"collection.path={collection}",
            "collection.max_documents=null", f"store.encoder={encoder}", "query.send=embedding"])
        t1 = time.perf_counter()
        index(cfg, cfg.run_dir, log=lambda *_: None)
        fed = FederatedRAG(cfg, cfg.run_dir)
        try:
            r = retrieval_eval(fed, questions, [1, 5, 10], log=log, central=False)
        finally:
            fed.close()
        res[name] = {"index_seconds": round(time.perf_counter() - t1, 1), **r}
        log(f"{name}: held-out recall@5 {r['metrics']['federated_exact']['recall@5']:.4f} over {len(questions)} questions")
    return res


def write(results: dict, header: list[str], command: str, info: dict, out: Path | None) -> str:
    """The results markdown (also written with the JSON under ``out``, unless None)."""
    lines = list(header)
    lines += ["", "All retrieval figures are over documents (a document counts once, at its best passage).", ""]
    if "elements" in results:
        e = results["elements"]["text"]
        lines += ["## Elements (7 owners = periods of the periodic table, 119 entries, 236 questions)", "",
                  to_markdown(e).split("\n", 2)[2]]
        emb = results["elements"]["embedding"]["retrieval"]
        lines += [f"- question sent as an embedding instead of text: recall@5 {emb['metrics']['federated_exact']['recall@5']:.3f}, "
                  f"{emb['bytes_per_question']:.0f} bytes per question (text: {e['retrieval']['bytes_per_question']:.0f}); "
                  f"retrieval {emb['federated_seconds_per_question']:.3f} s per question "
                  f"(text: {e['retrieval']['federated_seconds_per_question']:.3f} s: each owner embeds the question itself)", ""]
        a = e.get("answers", {})
        if "closed_book" in a:
            cb = a["closed_book"]["accuracy"]
            for m in ("centralized", "passages", "owner_answers", "guarded"):
                if m in a:
                    ratio = a[m]["accuracy"] / cb if cb else float("inf")
                    lines.append(f"- {m}: {a[m]['accuracy']:.3f} = {ratio:.2f}x closed-book ({cb:.3f})")
            lines.append("")
    if "foldoc" in results:
        f = results["foldoc"]
        lines += [f"## FOLDOC (9 owners = domain tags; {f['documents']} definitions, evenly spaced over the 12k)", "",
                  to_markdown(results["foldoc"]).split("\n", 2)[2],
                  f"- indexing all owners: {results['foldoc']['index_seconds']:.0f} s", ""]
    if "retriever" in results:
        r = results["retriever"]
        base = r["base MiniLM"]
        lines += ["## Federated retriever training (configs/rag_retriever_foldoc.yaml), then re-indexing", "",
                  f"- training: {r['train_seconds']:.0f} s, {r['train_summary']['bytes_total'] / 2**20:.1f} MiB communicated; "
                  f"held-out questions: {base['questions']} (their pairs were in no owner's training data), "
                  f"searched over the federation's whole collection ({r['documents']} FOLDOC entries, 9 owners)", "",
                  "| encoder | recall@1 | recall@5 | recall@10 | MRR |", "|---|---|---|---|---|"]
        for name in ("base MiniLM", "federated-trained"):
            m = r[name]["metrics"]["federated_exact"]
            lines.append(f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rag.md").write_text(text)
        (out / "rag.json").write_text(json.dumps({"command": command, "machine": info, **results}, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["elements", "foldoc", "retriever"],
                    choices=["elements", "foldoc", "retriever"])
    add_quick_args(ap, "24 Elements entries (6 questions, 1 answered with 4 tokens), 50 FOLDOC entries, 1 training round on 60")
    args = ap.parse_args()
    out = results_dir(args)
    command, info, header = result_header("Federated RAG: retrieval, answers, latency and bytes per mode", "benchmarks/rag.py")
    saved = out / "rag.json" if out else None
    previous = json.loads(saved.read_text()) if saved and saved.is_file() else {}
    results = {k: previous[k] for k in ("elements", "foldoc", "retriever") if k in previous and k not in args.parts}
    with tempfile.TemporaryDirectory(prefix="fedfm-rag-bench-") as tmp:
        for part in args.parts:
            extra = QUICK[part] if args.quick else []
            results[part] = globals()[f"part_{part}"](Path(tmp), lambda m: print(m, flush=True), extra)
            results[part]["run"] = {"command": command, "date": info["date"]}
            kept = [f"  - {k}: `{r['run']['command']}`, {r['run']['date']}" for k, r in results.items() if "run" in r]
            text = write(results, header + ["- each part's command and date:", *kept], command, info, out)
    print(text)


if __name__ == "__main__":
    main()
