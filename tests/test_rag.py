"""Federated RAG: dictd parsing, merges and metrics by hand, the owner's store, privacy modes, audit
log, budget, deadline, and the federated exact merge against one centralized index on real data.

Real components throughout: all-MiniLM-L6-v2 embeddings, FAISS, the Elements collection from Debian
(fetched by ``fedfm data fetch``), SmolLM2-135M-Instruct for the end-to-end answer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.data.dictd import (
    Document,
    b64_number,
    chunk_document,
    element_document,
    element_questions,
    foldoc_document,
    load_collection,
    read_dictd,
)
from fedfm.errors import DataError, FedFMError
from fedfm.rag import config as rag_config
from fedfm.rag.generate import is_correct
from fedfm.rag.merge import OwnedHit, doc_ranking, merge_exact, merge_rrf, recall_at, reciprocal_rank

# ---------------------------------------------------------------- dictd parsing (hand-made database)


def test_b64_numbers_by_hand():
    # dictd's alphabet A-Z a-z 0-9 + /: 'A'=0, 'b'=27, '/'=63, 'BA' = 1*64 + 0
    assert [b64_number(s) for s in ("A", "b", "/", "BA", "NP1")] == [0, 27, 63, 64, 13 * 4096 + 15 * 64 + 53]
    with pytest.raises(DataError):
        b64_number("A-")


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = alphabet[n % 64] + s
        n //= 64
        if not n:
            return s


def _write_dictd(tmp_path: Path, entries: list[tuple[list[str], str]]) -> tuple[Path, Path]:
    raw, lines = b"", ["00databaseshort\tA\tB"]
    for words, text in entries:
        data = text.encode()
        for w in words:
            lines.append(f"{w}\t{_b64(len(raw))}\t{_b64(len(data))}")
        raw += data
    (tmp_path / "x.index").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "x.dict.dz", "wb") as fh:
        fh.write(raw)
    return tmp_path / "x.index", tmp_path / "x.dict.dz"


FOLDOC_ENTRY = """16750C
16C750

   <hardware, networking> A {UART} with a 64-byte
   {FIFO}.

   The 16C750 is a {CMOS} version.

   (2004-03-24)
"""


def test_read_dictd_merges_aliases_and_parses_foldoc_entries(tmp_path):
    idx, dz = _write_dictd(tmp_path, [(["16750C", "16C750"], FOLDOC_ENTRY), (["iron"], "iron\nSymbol: Fe\nAtomic number: 26\nA metal.\n")])
    entries = read_dictd(idx, dz)
    assert [words for words, _ in entries] == [["16750C", "16C750"], ["iron"]]
    doc = foldoc_document(*entries[0])
    assert doc["title"] == "16750C" and doc["aliases"] == ["16C750"]
    assert doc["tags"] == ["hardware", "networking"]
    assert doc["text"] == "A UART with a 64-byte FIFO.\n\nThe 16C750 is a CMOS version."  # braces and date gone
    el = element_document(*entries[1])
    assert (el["symbol"], el["number"]) == ("Fe", 26)
    (tmp_path / "x.index").write_text("broken line without tabs\n")
    with pytest.raises(DataError, match="x.index:1"):
        read_dictd(idx, dz)


def test_chunking_windows_overlap_and_carry_the_title():
    doc = Document("d", "Term", " ".join(f"w{i}" for i in range(20)), "o")
    chunks = chunk_document(doc, words=8, overlap=2)
    # windows start every 6 words: 0, 6, 12 (the last reaching word 19); each headed by the title
    assert [c.split("\n")[1].split()[0] for c in chunks] == ["w0", "w6", "w12"]
    assert all(c.startswith("Term\n") for c in chunks) and chunks[-1].endswith("w19")


# ---------------------------------------------------------------- merges and metrics by hand


def _h(owner, doc, chunk, score):
    return OwnedHit(owner, doc, chunk, score)


def test_exact_merge_and_rrf_by_hand():
    lists = {"a": [_h("a", "a1", 1, 0.9), _h("a", "a2", 2, 0.5)], "b": [_h("b", "b1", 7, 0.8), _h("b", "b2", 8, 0.7)]}
    assert [h.doc for h in merge_exact(lists, 3)] == ["a1", "b1", "b2"]
    # RRF with rrf_k=60: rank-1 passages score 1/61 (a1, b1: tie broken by own score 0.9 > 0.8), rank-2 1/62
    rrf = merge_rrf(lists, 4, rrf_k=60)
    assert [h.doc for h in rrf] == ["a1", "b1", "b2", "a2"]
    assert rrf[0].score == pytest.approx(1 / 61) and rrf[2].score == pytest.approx(1 / 62)


def test_recall_and_mrr_by_hand():
    hits = [_h("a", "x", 1, 0.9), _h("a", "x", 2, 0.8), _h("b", "y", 3, 0.7), _h("b", "z", 4, 0.6)]
    ranking = doc_ranking(hits)
    assert ranking == ["x", "y", "z"]  # x's second passage does not take a rank
    assert recall_at(ranking, {"y"}, 1) == 0.0 and recall_at(ranking, {"y"}, 2) == 1.0
    assert recall_at(ranking, {"y", "q"}, 3) == 0.5
    assert reciprocal_rank(ranking, {"z"}) == pytest.approx(1 / 3) and reciprocal_rank(ranking, {"q"}) == 0.0


def test_exact_merge_of_faiss_shards_equals_one_index():
    """Random unit vectors split over 4 owners: the merged per-owner exact top-k is the top-k of one index."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    owner = rng.integers(0, 4, size=400)
    whole = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    whole.add_with_ids(x, np.arange(400))
    shards = {}
    for o in range(4):
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
        ids = np.flatnonzero(owner == o)
        idx.add_with_ids(x[ids], ids)
        shards[f"o{o}"] = idx
    for q in rng.normal(size=(20, 16)).astype(np.float32):
        q = (q / np.linalg.norm(q)).reshape(1, -1)
        _, i = whole.search(q, 10)
        lists = {}
        for name, idx in shards.items():
            sd, si = idx.search(q, 10)
            lists[name] = [_h(name, str(c), int(c), float(s)) for s, c in zip(sd[0], si[0]) if c >= 0]
        merged = merge_exact(lists, 10)
        assert [h.chunk for h in merged] == i[0].tolist()


def test_answer_checks():
    assert is_correct("The atomic number of iron is 26.", ("26",), "number")
    assert not is_correct("It is 126.", ("26",), "number") and not is_correct("26.98 u", ("26",), "number")
    assert is_correct("The symbol is Fe.", ("Fe",), "symbol") and not is_correct("Ferrous", ("Fe",), "symbol")
    assert not is_correct("Hydrogen", ("H",), "symbol") and is_correct("H", ("H",), "symbol")


# ---------------------------------------------------------------- a user's own question file


def test_question_file_reads_valid_lines_and_skips_blank_ones(tmp_path):
    from fedfm.rag.questions import read_questions

    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "Who discovered hydrogen?", "relevant": ["hydrogen"], "answers": ["Cavendish"]}\n'
                 "\n   \n"
                 '{"question": " Curie? ", "relevant": "polonium"}\n'
                 '{"question": "Curie", "relevant": ["polonium", "radium", "polonium"], "answers": []}\n')
    qs = read_questions(f, {"hydrogen", "polonium", "radium"})
    assert [q.id for q in qs] == ["q.jsonl:1", "q.jsonl:4", "q.jsonl:5"]  # lines 2-3 are blank
    assert qs[0].doc_ids == ("hydrogen",) and qs[0].answers == ("Cavendish",)
    assert qs[1].text == "Curie?" and qs[1].doc_ids == ("polonium",) and qs[1].answers == ()  # one id as a string
    assert qs[2].doc_ids == ("polonium", "radium")  # a repeated id counts once
    # free-text answers are matched lower-cased, without punctuation, anywhere in the answer
    assert is_correct("It was Henry CAVENDISH.", qs[0].answers, qs[0].kind)
    assert not is_correct("Lavoisier", qs[0].answers, qs[0].kind)


def test_question_file_errors_name_every_bad_line(tmp_path):
    from fedfm.rag.questions import read_questions

    f = tmp_path / "q.jsonl"
    f.write_text("\n".join([
        '{"question": "fine", "relevant": ["a"]}',                      # 1: good
        '{"question": "x", "relevant": []}',                            # 2: empty relevant
        "[1, 2]",                                                       # 3: not an object
        '{"question": "x", "relevant": ["a"',                           # 4: not JSON
        "",                                                             # 5: blank, skipped
        '{"question": "", "relevant": ["a"], "answer": ["typo"]}',      # 6: empty question, unknown key
        '{"question": "x", "relevant": ["a", "zz", "yy"]}',             # 7: two unknown documents
        '{"question": "x", "relevant": [3], "answers": "Paris"}',       # 8: number id, answers not a list
        '{"relevant": ["a"], "answers": ["ok", 2]}',                    # 9: no question, non-string answer
    ]) + "\n")
    with pytest.raises(DataError) as err:
        read_questions(f, {"a", "b"})
    msg = str(err.value)
    assert msg.startswith(f"{f} line 2: ") and msg.count("line ") == 7  # lines 2, 3, 4, 6, 7, 8, 9; not 1 or 5
    for part in ['line 2: "relevant" must be a non-empty list of document ids;',
                 "line 3: expected a JSON object, got list;",
                 "line 4: not JSON (",
                 ('line 6: unknown key "answer" (keys: question, relevant, answers), '
                  '"question" must be a non-empty string;'),
                 'line 7: document ids not in the collection: "zz", "yy";',
                 ('line 8: "relevant" must be a non-empty list of document ids (ids are strings: write "3", not 3), '
                  '"answers" must be a list of non-empty strings'),
                 'line 9: "question" must be a non-empty string, "answers" must be a list of non-empty strings']:
        assert part in msg, (part, msg)
    with pytest.raises(DataError, match="questions file not found"):
        read_questions(tmp_path / "missing.jsonl", {"a"})
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no questions"):
        read_questions(tmp_path / "blank.jsonl", {"a"})


# ---------------------------------------------------------------- stores and owners on real data


@pytest.fixture(scope="module")
def embedder():
    from fedfm.rag.embed import Embedder

    return Embedder("minilm", max_length=128, batch_size=32)


@pytest.fixture(scope="module")
def elements():
    return load_collection("elements")


def test_embeddings_match_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    from fedfm.models import resolve_model_path

    texts = ["What is the atomic number of iron?", "Iron Symbol: Fe", "a much longer sentence " * 5]
    ref = st.SentenceTransformer(str(resolve_model_path("minilm")), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(embedder.encode(texts), ref, atol=1e-5)


def test_store_adds_replaces_removes_and_survives_reopening(tmp_path, embedder, elements):
    from fedfm.rag.store import OwnerStore

    st = OwnerStore(tmp_path / "o", "minilm", embedder.dim, 96, 16)
    st.add(elements[:5], embedder)
    assert st.doc_ids() == {d.id for d in elements[:5]} and len(st) == 5
    first_ids = set(st.chunks)
    changed = Document(elements[0].id, elements[0].title, elements[0].text + " Extra sentence.", elements[0].owner)
    st.add([changed], embedder)  # same id: replaced, with a fresh chunk id (never reused)
    assert len(st) == 5 and not (set(st.chunks) - first_ids) <= first_ids
    assert st.remove([elements[1].id]) == 1 and elements[1].id not in st.doc_ids()
    st.save()
    again = OwnerStore.open(tmp_path / "o")
    assert again.chunks == st.chunks and again.next_id == st.next_id
    q = embedder.encode([f"What is the atomic number of {elements[2].title}?"])[0]
    assert again.search(q, 1)[0].doc == elements[2].id
    (tmp_path / "o" / "index" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        OwnerStore.open(tmp_path / "o")


def _cfg(tmp_path, **over):
    p = tmp_path / "rag.yaml"
    p.write_text(f"name: t\noutput_dir: {tmp_path}\ncollection: {{name: elements}}\n")
    return rag_config.load(p, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, embedder):
    """The Elements indexed once (7 owner stores); tests copy it into their own run directory."""
    from fedfm.rag.federation import index

    root = tmp_path_factory.mktemp("indexed")
    cfg = _cfg(root)
    index(cfg, cfg.run_dir, log=lambda *_: None)
    return cfg.run_dir


def _indexed_cfg(tmp_path, indexed, **over):
    import shutil

    cfg = _cfg(tmp_path, **over)
    shutil.copytree(indexed / "owners", cfg.run_dir / "owners")
    shutil.copyfile(indexed / "owners.json", cfg.run_dir / "owners.json")
    return cfg


def test_federated_exact_merge_equals_centralized_index_on_elements(tmp_path, embedder, indexed):
    """All 236 Elements questions: recall@k and MRR of the federated exact merge equal one central index's.

    The question goes out as an embedding (computed once, not by each of the 7 owners: faster, same vector)."""
    from fedfm.rag.evaluate import retrieval_eval
    from fedfm.rag.federation import FederatedRAG

    cfg = _indexed_cfg(tmp_path, indexed, **{"query.send": "embedding"})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        qs = element_questions(load_collection("elements"))
        r = retrieval_eval(fed, qs, [1, 5, 10], log=lambda *_: None)
    finally:
        fed.close()
    m = r["metrics"]
    assert r["questions"] == 236 and len(fed.owners) == 7
    assert m["federated_exact"] == m["centralized"]
    assert r["exact_equals_centralized_rankings"] == 236
    assert m["centralized"]["recall@5"] > 0.95  # MiniLM finds an element's entry by its name
    assert m["federated_rrf"]["recall@10"] <= m["federated_exact"]["recall@10"]


def test_guarded_release_threshold_cap_budget_and_audit_chain(tmp_path, embedder, indexed):
    from fedfm.rag.federation import FederatedRAG
    from fedfm.rag.owner import verify_audit_log

    cfg = _indexed_cfg(tmp_path, indexed, **{"guard.min_score": 0.55, "guard.max_k": 2, "guard.budget": 2, "query.k": 5})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        hits, out = fed.retrieve("What is the atomic number of iron?", mode="guarded", requester="alice")
        for resp in out.responses.values():
            assert len(resp["hits"]) <= 2 and all(h["score"] >= 0.55 for h in resp["hits"])
        assert hits[0].doc == "iron"
        fed.retrieve("What is the chemical symbol of gold?", mode="guarded", requester="alice")
        _, third = fed.retrieve("What is the chemical symbol of tin?", mode="guarded", requester="alice")
        assert not third.responses and all("budget of 2 exhausted" in why for why in third.missing.values())
        _, bob = fed.retrieve("What is the chemical symbol of tin?", mode="guarded", requester="bob")
        assert len(bob.responses) == 7  # budgets are per requester
        log = fed.owners["period-4"].audit_path
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["requester"] for r in records] == ["alice", "alice", "alice", "bob"]
        assert records[0]["released"]["hits"][0]["doc"] == "iron"  # exactly what left, verbatim
        assert "refused" in records[2]["released"]
        assert verify_audit_log(log) == 4
        lines = log.read_text().splitlines()
        log.write_text("\n".join(lines[:3]) + "\n")  # the last line cut off: caught by the head record
        with pytest.raises(ValueError, match="cut or edited tail"):
            verify_audit_log(log)
        log.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a removed line breaks the chain
        with pytest.raises(ValueError, match="line 2"):
            verify_audit_log(log)
        # budgets persist on disk: a new server process cannot reset them
        fed2 = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
        try:
            _, again = fed2.retrieve("What is the chemical symbol of tin?", mode="guarded", requester="alice")
            assert not again.responses
            # and an unreadable budget file fails closed
            (fed2.owners["period-1"].root / "budget.json").write_text("{broken")
            _, broken = fed2.retrieve("What is the chemical symbol of tin?", mode="guarded", requester="carol")
            assert "unreadable" in broken.missing["period-1"] and len(broken.responses) == 6
        finally:
            fed2.close()
    finally:
        fed.close()


def test_audit_head_lost_in_a_crash_is_rolled_forward_and_owners_refuse_modes_they_do_not_allow(tmp_path, embedder, indexed):
    from fedfm.rag.federation import FederatedRAG
    from fedfm.rag.owner import verify_audit_log

    cfg = _indexed_cfg(tmp_path, indexed, owner_modes="[guarded]", mode="guarded", **{"eval.modes": "[centralized]"})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        fed.retrieve("What is the atomic number of iron?", mode="guarded")
        owner = fed.owners["period-4"]
        head = owner.head_path.read_text()
        fed.retrieve("What is the atomic number of gold?", mode="guarded")
        owner.head_path.write_text(head)  # a writer died after appending its line, before updating the head
        _, out = fed.retrieve("What is the atomic number of tin?", mode="guarded")
        assert "period-4" in out.responses and verify_audit_log(owner.audit_path) == 3  # the chain continues
        owner.audit_path.write_text(owner.audit_path.read_text().splitlines()[0] + "\n")  # a cut, not a lost head
        _, cut = fed.retrieve("What is the atomic number of lead?", mode="guarded")
        assert "period-4" in cut.missing and "period-4" not in cut.responses  # nothing released past a broken log
        # the owners' policy, not the request, decides what may leave
        _, passages = fed.retrieve("What is the atomic number of iron?", mode="passages")
        assert not passages.responses
        assert all("does not answer mode 'passages'" in why for o, why in passages.missing.items() if o != "period-4")
    finally:
        fed.close()
    with pytest.raises(Exception, match="owner_modes"):
        _cfg(tmp_path, owner_modes="[guarded]")  # mode passages and eval's modes would all be refused


def audit_lines(cfg) -> list[str]:
    return (cfg.run_dir / "owners" / "period-6" / "audit.jsonl").read_text().splitlines()


def test_embedding_mode_keeps_the_question_text_from_owners_and_malformed_queries_are_refused(tmp_path, embedder, indexed):
    from fedfm.rag.federation import FederatedRAG
    from fedfm.rag.owner import encode_vector

    cfg = _indexed_cfg(tmp_path, indexed, **{"query.send": "embedding"})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        hits, _ = fed.retrieve("What is the chemical symbol of tungsten?")
        assert hits[0].doc == "tungsten"
        audit = (cfg.run_dir / "owners" / "period-6" / "audit.jsonl").read_text()
        assert "tungsten?" not in audit and "embedding sha256:" in audit
        bad = fed.fan_out(b'{"mode": "passages", "embedding": "AAAA", "k": 3}')
        assert not bad.responses and all("malformed query" in why for why in bad.missing.values())
        junk = fed.fan_out(b"\xff not json")
        assert len(junk.missing) == 7
        q = embedder.encode(["What is the chemical symbol of tungsten?"])[0]

        def ask(**fields):
            out = fed.fan_out(json.dumps({"mode": "guarded", "requester": "eve", "k": 3, **fields}).encode())
            return out.missing.get("period-6", "")

        # a scaled query would lift every score past guard.min_score; a negated one would fetch the least similar
        assert "unit L2 norm" in ask(embedding=encode_vector(100 * q)) and "unit L2 norm" in ask(embedding=encode_vector(-100 * q))
        # the log must record what was searched: a decoy text beside an embedding is refused
        assert "not both" in ask(embedding=encode_vector(q), text="harmless")
        assert "from 1 to 1000" in ask(embedding=encode_vector(q), k=10**9) and "from 1 to 1000" in ask(embedding=encode_vector(q), k=True)
        assert ask(embedding=encode_vector(q)) == ""  # the genuine query is answered
        records = [json.loads(line) for line in audit_lines(cfg)]
        # refused queries are logged too, each under the hash of the embedding that was sent (never the decoy text)
        assert all(r["query"].startswith("embedding sha256:") for r in records[-6:])
    finally:
        fed.close()
    with pytest.raises(Exception, match="owner_answers needs the question text"):
        _cfg(tmp_path, **{"query.send": "embedding", "mode": "owner_answers"})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        with pytest.raises(FedFMError, match="owner-side answering needs the question text"):
            fed.ask("What is the symbol of gold?", mode="owner_answers")  # never silently sends the text
    finally:
        fed.close()
    with pytest.raises(Exception, match="eval.ks"):
        _cfg(tmp_path, **{"eval.ks": "[]"})


def test_an_owner_past_the_deadline_is_left_out_and_named(tmp_path, embedder, indexed):
    from fedfm.rag.federation import FederatedRAG

    # the question goes as an embedding, so a prompt owner only searches (milliseconds even on a loaded machine)
    cfg = _indexed_cfg(tmp_path, indexed, **{"query.deadline_s": 2.0, "faults.slow_owners": "{period-4: 6.0}",
                                             "query.send": "embedding"})
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        hits, out = fed.retrieve("What is the atomic number of iron?")
        assert "period-4" not in out.responses and "2 s deadline" in out.missing["period-4"]
        assert len(out.responses) == 6 and "iron" not in doc_ranking(hits)  # iron lives at period-4
        # the late owner is not sent more questions while it is still busy; the others keep answering
        for q in ("What is the chemical symbol of gold?", "What is the chemical symbol of tin?"):
            _, nxt = fed.retrieve(q)
            assert len(nxt.responses) == 6 and "still busy" in nxt.missing["period-4"]
    finally:
        fed.close()


def test_incremental_index_embeds_only_changes_and_rebuilds_for_a_new_encoder(tmp_path, embedder):
    import os

    from fedfm.rag.embed import Embedder
    from fedfm.rag.federation import sync_store
    from fedfm.rag.store import OwnerStore

    cfg = _cfg(tmp_path)
    docs = load_collection("elements")[:6]
    first = sync_store(tmp_path / "o", "o", docs, embedder, cfg)
    assert first["added_docs"] == 6
    again = sync_store(tmp_path / "o", "o", docs[:5], embedder, cfg)
    assert (again["added_docs"], again["removed_docs"], again["documents"]) == (0, 1, 5)
    edited = [Document(d.id, d.title, d.text + (" Edited." if i == 2 else ""), d.owner) for i, d in enumerate(docs[:5])]
    third = sync_store(tmp_path / "o", "o", edited, embedder, cfg)
    assert (third["added_docs"], third["removed_docs"]) == (1, 0)  # only the edited document is re-embedded
    before = OwnerStore.open(tmp_path / "o")
    # other weights or token limit -> other fingerprint -> a full rebuild, chunk ids continuing (never reused)
    short = Embedder("minilm", max_length=64)
    assert short.fingerprint != embedder.fingerprint
    rebuilt = sync_store(tmp_path / "o", "o", edited, short, _cfg(tmp_path, **{"store.max_length": 64}))
    after = OwnerStore.open(tmp_path / "o")
    assert rebuilt["rebuilt"] and min(after.chunks) >= before.next_id and after.encoder_id == short.fingerprint
    # a crash between the two renames of a save: the previous store is put back on the next open
    os.makedirs(tmp_path / "o" / ".index-old-x")
    os.replace(tmp_path / "o" / "index", tmp_path / "o" / ".index-old-x" / "index")
    assert OwnerStore.open(tmp_path / "o").chunks == after.chunks


# ---------------------------------------------------------------- evaluation on a user's own questions

KITCHEN_AND_GEOLOGY = [  # two owners, two documents each, on four distinct topics
    {"id": "bread", "owner": "kitchen", "title": "Sourdough bread",
     "text": "Mix flour, water, salt and a starter, let the dough rise overnight, then bake it for forty minutes."},
    {"id": "soup", "owner": "kitchen", "title": "Tomato soup",
     "text": "Simmer tomatoes, onions and garlic in stock for twenty minutes, blend until smooth, season with basil."},
    {"id": "volcano", "owner": "geology", "title": "Volcanoes",
     "text": "A volcano erupts when molten rock rises from the mantle; the lava that flows out cools into basalt."},
    {"id": "glacier", "owner": "geology", "title": "Glaciers",
     "text": "A glacier is a slow river of ice that carves U-shaped valleys and leaves moraines behind as it melts."},
]
OWN_QUESTIONS = [
    {"question": "How long should sourdough dough rise?", "relevant": ["bread"], "answers": ["overnight"]},
    {"question": "What flows out of an erupting volcano?", "relevant": "volcano", "answers": ["Lava"]},
    {"question": "What shape of valley does a glacier carve?", "relevant": ["glacier"]},
    {"question": "What can I cook in my kitchen?", "relevant": ["bread", "soup"]},
    {"question": "Which spice goes into tomato soup?", "relevant": ["soup"], "answers": ["paprika"]},
]


class _FirstPassage:
    """A stand-in generator that answers with the top passage's text (closed-book: nothing), so that answer
    accuracy is known by hand from the documents; the real generator is tested end to end below."""

    def answer(self, question, passages):
        from fedfm.rag.generate import Generated

        return Generated(passages[0].text if passages else "", 1.0, 0)


def test_eval_on_own_questions_by_hand(tmp_path, embedder):
    from fedfm.rag.evaluate import evaluate
    from fedfm.rag.federation import FederatedRAG, index

    docs, qfile = tmp_path / "docs.jsonl", tmp_path / "own.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in KITCHEN_AND_GEOLOGY))
    qfile.write_text("".join(json.dumps(q) + "\n" for q in OWN_QUESTIONS))
    cfg = _cfg(tmp_path, **{"collection.name": "jsonl", "collection.path": docs, "eval.questions": qfile,
                            "eval.ks": "[1, 5]", "eval.modes": "[closed_book, centralized, passages]"})
    index(cfg, cfg.run_dir, log=lambda *_: None)
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder, generator=_FirstPassage())
    try:
        r = evaluate(cfg, cfg.run_dir, log=lambda *_: None, fed=fed)
    finally:
        fed.close()
    assert r["questions"] == {"source": "file", "path": str(qfile), "count": 5, "with_answers": 3}
    # each question names its topic, so its document ranks first; the kitchen question has two relevant
    # documents and only one fits at rank 1: recall@1 = (1 + 1 + 1 + 1/2 + 1) / 5 = 0.9, MRR = 1.
    # Recall@5 = 1: 4 documents of one short passage each, all retrieved.
    for m in ("centralized", "federated_exact", "federated_rrf"):
        assert r["retrieval"]["metrics"][m] == {"recall@1": 0.9, "recall@5": 1.0, "mrr": 1.0}, m
    assert r["retrieval"]["questions"] == 5 and r["retrieval"]["exact_equals_centralized_rankings"] == 5
    # answers: only the 3 questions with answers; the top passage holds "overnight" and "lava" but not "paprika"
    # (2/3); closed-book the stand-in says nothing (0/3)
    a = r["answers"]
    assert {m: (a[m]["correct"], a[m]["questions"]) for m in a} == {
        "closed_book": (0, 3), "centralized": (2, 3), "passages": (2, 3)}
    md = (cfg.run_dir / "eval.md").read_text()
    assert f"- questions: 5 from {qfile} (3 with answers)" in md
    assert json.loads((cfg.run_dir / "eval.json").read_text())["questions"]["count"] == 5


def test_cli_eval_with_a_question_file_and_bad_ones(tmp_path):
    docs, qfile = tmp_path / "docs.jsonl", tmp_path / "own.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in KITCHEN_AND_GEOLOGY))
    qfile.write_text("".join(json.dumps(q) + "\n" for q in OWN_QUESTIONS))
    cfg = tmp_path / "rag.yaml"
    cfg.write_text(f"name: own\noutput_dir: {tmp_path}\ncollection: {{name: jsonl, path: {docs}}}\n"
                   "eval: {modes: [], ks: [1]}\n")  # retrieval only: no generator
    runner = CliRunner()
    r = runner.invoke(app, ["rag", "index", str(cfg)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["rag", "eval", str(cfg), "--questions", str(qfile), "--set", "eval.max_questions=2"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "own" / "eval.json").read_text())
    assert res["questions"] == {"source": "file", "path": str(qfile), "count": 5, "with_answers": 3}
    # 2 of 5 evenly spaced: questions 1 and 3 (int(i * 5 / 2) for i = 0, 1), one relevant document each, found first
    assert res["retrieval"]["questions"] == 2 and res["retrieval"]["metrics"]["federated_exact"]["recall@1"] == 1.0
    r = runner.invoke(app, ["rag", "eval", str(cfg)])  # without the file: each document's title is its question
    assert r.exit_code == 0, r.output
    assert "- questions: 4 generated from the collection (0 with answers)" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "relevant": ["bread"]}\nnot json\n{"question": "y", "relevant": ["cake"]}\n')
    r = runner.invoke(app, ["rag", "eval", str(cfg), "--questions", str(bad)])
    assert r.exit_code == 2, r.output
    assert "line 2: not JSON" in r.output and 'line 3: document id not in the collection: "cake"' in r.output
    status = json.loads((tmp_path / "own" / "status.json").read_text())
    assert status["status"] == "indexed" and "line 2" in status["last_eval_failed"]
    r = runner.invoke(app, ["rag", "eval", str(cfg), "--questions", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "questions file not found" in r.output


# ---------------------------------------------------------------- CLI end to end with the generator


@pytest.mark.slow
def test_cli_index_ask_and_bad_input(tmp_path):
    cfg = tmp_path / "rag.yaml"
    cfg.write_text(f"name: e2e\noutput_dir: {tmp_path}\ncollection: {{name: elements}}\n"
                   "generator: {max_new_tokens: 12, context_passages: 2}\n")
    runner = CliRunner()
    r = runner.invoke(app, ["rag", "index", str(cfg)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e2e" / "status.json").read_text())["status"] == "indexed"
    r = runner.invoke(app, ["rag", "ask", str(cfg), "What is the chemical symbol of tungsten?", "--json"])
    assert r.exit_code == 0, r.output
    ans = json.loads(r.output)
    assert "W" in ans["answer"].replace(".", " ").split()
    assert {"owner": "period-6", "document": "tungsten"} == ans["citations"][0]
    assert len(ans["owners_answered"]) == 7 and "period-6" in ans["owners_used"]
    assert ans["bytes_received"] > ans["bytes_sent"] > 0
    r = runner.invoke(app, ["rag", "ask", str(cfg), "What is the atomic number of tungsten?", "--json",
                            "--mode", "owner_answers"])
    assert r.exit_code == 0, r.output
    ans = json.loads(r.output)
    assert is_correct(ans["answer"], ("74",), "number") and ans["citations"][0]["owner"] == "period-6"
    # bad input: one line, exit code 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = runner.invoke(app, ["rag", "index", str(cfg), "--set", "collection.name=jsonl", "--set", f"collection.path={empty}",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is empty" in r.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "fine", "owner": "x"}\n{"id": "b", "text": \n')
    r = runner.invoke(app, ["rag", "index", str(cfg), "--set", "collection.name=jsonl", "--set", f"collection.path={broken}",
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "line 2: invalid JSON" in r.output
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"id": "a", "text": "caf\u00e9", "owner": "x"}\n'.encode("latin-1"))
    r = runner.invoke(app, ["rag", "index", str(cfg), "--set", "collection.name=jsonl", "--set", f"collection.path={latin}",
                            "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "not valid UTF-8" in r.output
    assert json.loads((tmp_path / "z" / "status.json").read_text())["status"] == "failed"
    twins = tmp_path / "twins.jsonl"  # "a b" and "a/b" would share the store directory "a-b"
    twins.write_text('{"id": "1", "text": "one", "owner": "a b"}\n{"id": "2", "text": "two", "owner": "a/b"}\n')
    r = runner.invoke(app, ["rag", "index", str(cfg), "--set", "collection.name=jsonl", "--set", f"collection.path={twins}",
                            "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "map to the same directory 'a-b'" in r.output
    r = runner.invoke(app, ["rag", "ask", str(cfg), "hello", "--out", str(tmp_path / "z")])  # a failed index is not asked
    assert r.exit_code == 2 and "did not finish (DataError" in r.output
    # every owner over its budget: the answer names them and makes nothing up
    r = runner.invoke(app, ["rag", "ask", str(cfg), "What is the symbol of gold?", "--mode", "guarded",
                            "--set", "guard.budget=0"])
    assert r.exit_code == 0 and "no owner released anything" in r.output
    assert r.output.count("budget of 0 exhausted") == 7
    r = runner.invoke(app, ["rag", "ask", str(cfg), "hello", "--out", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "run `fedfm rag index` first" in r.output
    r = runner.invoke(app, ["rag", "ask", str(cfg), "hello", "--mode", "shout"])
    assert r.exit_code == 2 and "unknown mode 'shout'" in r.output


def test_an_owner_with_a_damaged_store_is_named_in_every_answer(tmp_path, embedder, indexed):
    from fedfm.rag.federation import FederatedRAG

    cfg = _indexed_cfg(tmp_path, indexed)
    (cfg.run_dir / "owners" / "period-2" / "index" / "chunks.jsonl").write_text("not json\n")
    fed = FederatedRAG(cfg, cfg.run_dir, embedder=embedder)
    try:
        hits, out = fed.retrieve("What is the atomic number of carbon?")  # carbon lives at period-2
    finally:
        fed.close()
    assert "store unavailable" in out.missing["period-2"] and len(out.responses) == 6
    assert "carbon" not in doc_ranking(hits)


def test_rag_over_flower_refuses_bad_input_before_touching_the_network(tmp_path):
    # the coordinator holds no documents: evaluation needs the user's questions; the engine and its address are checked
    from typer.testing import CliRunner

    from fedfm.cli import app as cli_app
    from fedfm.rag.remote import export_rag_owners

    cfg = tmp_path / "rag.yaml"
    cfg.write_text(f"name: t\noutput_dir: {tmp_path}\ncollection: {{name: elements, max_documents: 12}}\n")
    net = ["--federation", "127.0.0.1:9", "--root-certificates", str(tmp_path / "ca.crt")]
    for args, why in ((["eval", str(cfg), "--engine", "flower", *net], "give your own with --questions"),
                      (["index", str(cfg), "--engine", "flower"], "needs --federation"),
                      (["index", str(cfg), "--engine", "ray"], "unknown engine 'ray'")):
        res = CliRunner().invoke(cli_app, ["rag", *args])
        assert res.exit_code == 2 and why in res.output, (args, res.output)
    # one owner directory per owner of the collection, each with the config's policy for the owner to edit
    dirs = export_rag_owners(rag_config.load(cfg), tmp_path / "owners")
    assert [d.name for d in dirs] == sorted(d.name for d in dirs) and len(dirs) >= 2
    meta = json.loads((dirs[0] / "owner.json").read_text())
    assert meta["task"] == "rag" and meta["num_clients"] == len(dirs)
    assert json.loads((dirs[0] / "policy.json").read_text())["owner_modes"] == ["passages", "owner_answers", "guarded"]
    assert sum(len((d / "docs.jsonl").read_text().splitlines()) for d in dirs) == 12
    with pytest.raises(DataError, match="not empty"):
        export_rag_owners(rag_config.load(cfg), tmp_path / "owners")
