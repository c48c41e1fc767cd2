"""Federated RAG across machines: each owner's store, policy, budgets and audit log on its own Flower node.

A SuperLink and three SuperNodes (each with its owner worker) on loopback with TLS and node authentication; the
owners hold the real Elements collection (regrouped by period into three owners). Reference numbers: the embedded
federation (``fedfm.rag.federation``) on the same documents and questions, which must give the same retrieval
metrics and the same bytes per question. Every process is started here and stopped here by PID.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from typer.testing import CliRunner

from fedfm.cli import app as cli_app
from fedfm.data.dictd import element_questions, load_collection, period
from fedfm.deploy import LocalFederation
from fedfm.rag import config as rag_config
from fedfm.rag.owner import verify_audit_log
from fedfm.rag.remote import export_rag_owners

from test_flower import clientapps, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("services")]

GROUPS = {1: "lab-a", 2: "lab-a", 3: "lab-a", 4: "lab-b", 5: "lab-b", 6: "lab-c", 7: "lab-c"}


@pytest.fixture(scope="module")
def rag_federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-flower")
    docs = root / "elements.jsonl"
    with open(docs, "w") as f:
        for d in load_collection("elements"):
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text,
                                "owner": GROUPS[period(int(d.meta["number"]))]}) + "\n")
    (root / "rag.yaml").write_text(f"name: rag\noutput_dir: {root / 'runs'}\nthreads: 1\n"
                                   f"collection: {{name: jsonl, path: {docs}}}\n")
    cfg = rag_config.load(root / "rag.yaml")
    owners = export_rag_owners(cfg, root / "owners")
    assert [o.name for o in owners] == ["lab-a", "lab-b", "lab-c"]
    policy = json.loads((owners[0] / "policy.json").read_text())  # lab-a's own policy: passages only
    (owners[0] / "policy.json").write_text(json.dumps({**policy, "owner_modes": ["passages"]}))
    # 4 questions, evenly spaced (each is one Flower message exchange, about 5 s on loopback: the benchmark asks all)
    qs = element_questions(load_collection("elements"))[::60]
    (root / "questions.jsonl").write_text("".join(json.dumps({"question": q.text, "relevant": list(q.doc_ids),
                                                              "answers": list(q.answers)}) + "\n" for q in qs))
    fed = LocalFederation(root / "fed", owners)
    try:
        fed.start()
        fed.cfg_path, fed.run = root / "rag.yaml", root / "flower-rag"
        cli(fed, "index", str(fed.cfg_path), "--out", str(fed.run))  # each owner indexes on its own node
        yield fed
    finally:
        fed.close()


def cli(fed: LocalFederation, *args: str) -> str:
    res = CliRunner().invoke(cli_app, ["rag", *args, "--engine", "flower", "--federation", fed.address,
                                       "--root-certificates", str(fed.ca)])
    assert res.exit_code == 0, res.output[-3000:]
    return res.output


def test_rag_over_flower_equals_the_embedded_federation_and_audits_on_each_node(rag_federation, tmp_path):
    from fedfm.rag.evaluate import evaluate
    from fedfm.rag.federation import index

    fed, cfg_path, run = rag_federation, rag_federation.cfg_path, rag_federation.run
    qfile = cfg_path.parent / "questions.jsonl"
    report = json.loads((run / "index.json").read_text())
    assert sorted(report) == ["lab-a", "lab-b", "lab-c"] and all(r["passages"] > 0 for r in report.values())
    for i in range(3):  # each store sits in its own node's state directory, not in the run directory
        assert (fed.root / "state" / f"node{i}" / "rag" / "store" / "index").is_dir()
    assert not (run / "owners").exists()

    sets = ["--set", "eval.modes=[]", "--set", "eval.ks=[1, 5, 10]"]
    cli(fed, "eval", str(cfg_path), "--out", str(run), "--questions", str(qfile), *sets)
    flower = json.loads((run / "eval.json").read_text())

    # the embedded federation on the same documents and questions (the reference)
    cfg = rag_config.load(cfg_path, ["eval.modes=[]", "eval.ks=[1, 5, 10]", f"eval.questions={qfile}"])
    emb_root = tmp_path / "embedded"
    index(cfg, emb_root, log=lambda *_: None)
    emb = evaluate(cfg, emb_root, log=lambda *_: None)
    for m in ("federated_exact", "federated_rrf"):
        assert flower["retrieval"]["metrics"][m] == emb["retrieval"]["metrics"][m], m
    assert flower["retrieval"]["questions"] == emb["retrieval"]["questions"] == 4
    assert flower["retrieval"]["bytes_per_question"] == emb["retrieval"]["bytes_per_question"]
    assert flower["owners"] == emb["owners"]  # passages per owner, as each node reported its store

    # every node's audit log verifies, and names the authenticated SuperLink and the run beside the declared name
    for i in range(3):
        audit = fed.root / "state" / f"node{i}" / "rag" / "store" / "audit.jsonl"
        assert verify_audit_log(audit) == 4  # one line per evaluation question
        last = json.loads(audit.read_text().splitlines()[-1])
        assert last["requester"] == f"flower:{fed.address}" and last["declared_requester"].startswith("eval-")
        assert last["run"].isdigit()


def test_an_owner_vanishing_mid_question_is_named_and_the_rest_answer(rag_federation, tmp_path):
    """A guarded question: lab-a refuses it by its own policy (the run's config allows it), lab-c's machine dies while
    it works on it, lab-b answers."""
    fed, cfg_path = rag_federation, rag_federation.cfg_path
    run = tmp_path / "ask"
    # lab-c takes 30 s per answer (a simulated slow owner), so it is surely mid-question when it is killed
    sets = ["--set", "faults.slow_owners={lab-c: 30}", "--set", "query.deadline_s=20"]
    result: dict = {}

    def ask():
        result["out"] = cli(fed, "ask", str(cfg_path), "What is the chemical symbol of iron?", "--out", str(run),
                            "--mode", "guarded", "--requester", "someone-else", "--json", *sets)

    t = threading.Thread(target=ask)
    t.start()
    node2 = fed.procs["node2"].pid
    # the roll call is over once the run directory has its roster; then lab-c's ClientApp is the question's
    wait_for("the roll call", lambda: (run / "nodes.json").is_file(), every=0.2)
    wait_for("lab-c's ClientApp on the question", lambda: clientapps(node2), every=0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    fed.stop("node2", signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    out = result["out"]
    ans = json.loads(out[out.index("{"):])
    # named as gone (the SuperLink reports a node that missed its heartbeats) or, if that takes longer, as past the
    # question's deadline; the question never waits for it beyond the deadline
    why = ans["owners_missing"]["lab-c"]
    assert "Node Unavailable" in why or "deadline" in why, why
    assert "does not answer mode 'guarded'" in ans["owners_missing"]["lab-a"]
    assert ans["owners_answered"] == ["lab-b"]
    assert {"owner": "lab-b", "document": "iron"} in ans["citations"]  # iron (period 4) is lab-b's
    assert time.monotonic() - t0 < 60
    # the refusal is audited on lab-a's node too, charged to the SuperLink, with the declared name beside it
    last = json.loads((fed.root / "state" / "node0" / "rag" / "store" / "audit.jsonl").read_text().splitlines()[-1])
    assert last["requester"] == f"flower:{fed.address}" and last["declared_requester"] == "someone-else"
    assert "does not answer mode 'guarded'" in last["released"]["error"]
