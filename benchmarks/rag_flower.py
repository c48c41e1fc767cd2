"""Federated RAG across machines (issue 24): the Elements on Flower nodes against the embedded federation.

    python benchmarks/rag_flower.py                  # 4 owner nodes, all 236 Elements questions (~10 minutes)
    python benchmarks/rag_flower.py --quick --out /tmp/rf   # 40 documents, 10 questions (tests)

The Elements (119 entries) regrouped by period into four owners (periods 1-2, 3-4, 5-6, 7), each owner's
documents in its own owner directory (``fedfm rag split``) served by its own SuperNode and owner worker, the
SuperLink and the nodes on this machine's loopback with TLS and node authentication (``LocalFederation``). The
same commands a user runs: ``fedfm rag index|eval --engine flower``, the questions as a user's JSONL file. The
reference is the embedded federation (``fedfm rag index|eval``) on the same documents and questions, in the same
run. Measured: recall@k and MRR of both (exact merge and RRF), seconds and bytes per question, wall time of each
command, and each node's audit log, verified (``verify_audit_log``).

Writes benchmarks/results/rag_flower.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import add_quick_args, result_header, results_dir, write_results  # noqa: E402

GROUPS = {1: "lab-a", 2: "lab-a", 3: "lab-b", 4: "lab-b", 5: "lab-c", 6: "lab-c", 7: "lab-d"}


def prepare(root: Path, quick: bool) -> tuple[Path, Path]:
    """The collection (owner per period pair), the config and the questions file."""
    from fedfm.data.dictd import element_questions, load_collection, period

    docs = load_collection("elements")
    if quick:
        docs = docs[::3][:40]
    with open(root / "elements.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text,
                                "owner": GROUPS[period(int(d.meta["number"]))]}) + "\n")
    qs = element_questions(docs)
    if quick:
        qs = qs[:10]
    (root / "questions.jsonl").write_text("".join(json.dumps({"question": q.text, "relevant": list(q.doc_ids)}) + "\n"
                                                  for q in qs))
    (root / "rag.yaml").write_text(f"name: rag\noutput_dir: {root / 'runs'}\nthreads: 1\n"
                                   f"collection: {{name: jsonl, path: {root / 'elements.jsonl'}}}\n"
                                   "eval: {modes: [], ks: [1, 5, 10]}\n")
    return root / "rag.yaml", root / "questions.jsonl"


def fedfm(*args: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["fedfm", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"fedfm {' '.join(args)} failed: {(p.stdout + p.stderr)[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quick_args(ap, "40 documents, 10 questions")
    args = ap.parse_args()
    out = results_dir(args)
    from fedfm.deploy import LocalFederation
    from fedfm.rag import config as rag_config
    from fedfm.rag.owner import verify_audit_log
    from fedfm.rag.remote import export_rag_owners

    root = Path(tempfile.mkdtemp(prefix="fedfm-rag-flower-"))
    cfg_path, qfile = prepare(root, args.quick)
    owners = export_rag_owners(rag_config.load(cfg_path), root / "owners")
    walls = {}
    walls["embedded index"] = fedfm("rag", "index", str(cfg_path), "--out", str(root / "embedded"))
    walls["embedded eval"] = fedfm("rag", "eval", str(cfg_path), "--out", str(root / "embedded"), "--questions", str(qfile))
    with LocalFederation(root / "fed", owners) as fed:
        net = ["--engine", "flower", "--federation", fed.address, "--root-certificates", str(fed.ca)]
        walls["flower index"] = fedfm("rag", "index", str(cfg_path), "--out", str(root / "flower"), *net)
        walls["flower eval"] = fedfm("rag", "eval", str(cfg_path), "--out", str(root / "flower"), "--questions",
                                     str(qfile), *net)
        audits = {o.name: verify_audit_log(fed.root / "state" / f"node{i}" / "rag" / "store" / "audit.jsonl")
                  for i, o in enumerate(owners)}
        requesters = {json.loads(line)["requester"] for i in range(len(owners)) for line in
                      (fed.root / "state" / f"node{i}" / "rag" / "store" / "audit.jsonl").read_text().splitlines()}
    emb = json.loads((root / "embedded" / "eval.json").read_text())
    flw = json.loads((root / "flower" / "eval.json").read_text())
    rows = []
    for label, r in (("embedded federation (one process)", emb), ("Flower, one node per owner", flw)):
        ret = r["retrieval"]
        for m in ("federated_exact", "federated_rrf"):
            rows.append({"setting": label, "merge": m, **ret["metrics"][m],
                         "s_per_question": ret["federated_seconds_per_question"],
                         "bytes_per_question": ret["bytes_per_question"], "missing": ret["owners_missing_total"]})
    same = all(emb["retrieval"]["metrics"][m] == flw["retrieval"]["metrics"][m] for m in ("federated_exact", "federated_rrf"))
    keys = [k for k in rows[0] if k.startswith(("recall", "mrr"))]
    lines = ["| setting | merge | " + " | ".join(keys) + " | s / question | bytes / question | owners missing |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['merge']} | " + " | ".join(f"{r[k]:.3f}" for k in keys)
                     + f" | {r['s_per_question']:.3f} | {r['bytes_per_question']:,.0f} | {r['missing']} |")
    lines += ["", f"{emb['retrieval']['questions']} questions, {len(owners)} owners "
              f"({', '.join(f'{n}: {p} passages' for n, p in flw['owners'].items())}). Retrieval metrics equal: "
              f"{same}. Bytes per question are the query and response messages (the same count on both).",
              "", "| command | wall s |", "|---|---|"]
    lines += [f"| fedfm rag {k} | {v:.1f} |" for k, v in walls.items()]
    lines += ["", "Audit logs verified on each owner's node (lines): "
              + ", ".join(f"{n} {c}" for n, c in audits.items())
              + f"; requester recorded by the nodes: {', '.join(sorted(requesters))} (the SuperLink the node is "
              "connected to over TLS; the run's declared name is kept beside it)."]
    table = "\n".join(lines)
    print(table)
    command, info, head = result_header("Federated RAG over Flower", "benchmarks/rag_flower.py")
    write_results(out, "rag_flower", "\n".join(head) + "\n\n" + table + "\n",
                  {"command": command, "machine": info, "rows": rows, "walls": walls, "audit_lines": audits,
                   "equal": same})


if __name__ == "__main__":
    main()
