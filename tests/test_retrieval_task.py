"""Retrieval task: InfoNCE and ranking metrics against hand-worked numbers, pairs data, config rules, and a tiny
federated run of the real MiniLM encoder on real FOLDOC pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm import config as config_mod
from fedfm import report, server
from fedfm.app import App
from fedfm.config import DataConfig
from fedfm.data.dictd import collection_path
from fedfm.data.sources import load_dataset
from fedfm.errors import ConfigError
from fedfm.rundir import RunDir
from fedfm.tasks.retrieval import Pairs, RetrievalTask, info_nce, ranking_metrics


# --- loss ----------------------------------------------------------------------------------------
def test_info_nce_by_hand():
    # two pairs in 2-D: q0 = p0 = (1, 0); q1 = (0, 1), p1 = (0.6, 0.8). Cosines, times the scale 20:
    #   row 0: [20 * 1, 20 * 0.6]   = [20, 12]  -> -log softmax_0 = log(1 + e^-8)
    #   row 1: [20 * 0, 20 * 0.8]   = [0, 16]   -> -log softmax_1 = log(1 + e^-16)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-16))) / 2
    assert info_nce(q, p).item() == pytest.approx(expected, rel=1e-5)
    # scale 1: row 0 [1, 0.6] -> log(1 + e^-0.4); row 1 [0, 0.8] -> log(1 + e^-0.8)
    expected = (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8))) / 2
    assert info_nce(q, p, scale=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_ignores_a_repeated_passage():
    # rows 0 and 1 share passage key 7: each other's (identical) passage is not a negative, so row 0 sees only
    # itself and row 2 -> [s00, -inf, s02]. Worked with scale 1 on unit vectors.
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([7, 7, 3])
    # rows 0, 1: scores [1, (masked), 0] -> log(1 + e^-1); row 2: [0, 0, 1] -> log(1 + 2 e^-1)
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(2 * math.exp(-1))) / 3
    assert info_nce(q, p, key, scale=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_matches_sentence_transformers():
    pytest.importorskip("sentence_transformers")  # a dev dependency: the reference implementation
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    reference = MultipleNegativesRankingLoss(model=None).compute_loss_from_embeddings([q, p], None)
    assert info_nce(q, p, torch.arange(6)).item() == pytest.approx(reference.item(), rel=1e-5)


# --- metrics -------------------------------------------------------------------------------------
def test_ranking_metrics_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.5],  # target 0: best             -> rank 1
        [0.9, 0.8, 0.1, 0.2, 0.3, 0.4],  # target 1: only 0.9 above   -> rank 2
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # target 5: last of 6        -> rank 6
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # target 3: all tied        -> rank 6 (ties count against)
    ])
    target = torch.tensor([0, 1, 5, 3])
    m = ranking_metrics(scores, target)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 6) / 4)
    # reference: with one relevant label per row, scikit-learn's label ranking average precision is the MRR
    from sklearn.metrics import label_ranking_average_precision_score

    onehot = np.eye(6, dtype=int)[target.numpy()]
    assert m["mrr"] == pytest.approx(label_ranking_average_precision_score(onehot, scores.numpy()))


class _Lookup(torch.nn.Module):
    """A stand-in encoder: each token id's vector is a fixed row of ``table`` (mean-pooled by encode_batch)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.table[input_ids])


def test_evaluate_ranks_each_query_against_all_distinct_passages():
    # token ids 1..4 are 2-D directions; queries 0 and 1 ask about the same passage (token 1), query 2 about
    # token 3's passage; one query (3) is closest to passage 4, not its own passage 3 -> rank 2 of 3 distinct.
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    ids = lambda xs: torch.tensor([[x] for x in xs])  # one token per text
    ones = torch.ones(4, 1, dtype=torch.long)
    data = Pairs(ids([1, 1, 2, 4]), ones, ids([1, 1, 2, 3]), ones, torch.tensor([0, 0, 1, 2]))
    # distinct passages: (1,0), (0,1), (0.8,0.6). Query (0.6,0.8) targets (0.8,0.6): scores 0.6, 0.8, 0.96 -> rank 1.
    m = RetrievalTask().evaluate(_Lookup(table), data, batch_size=3)
    assert m["recall@1"] == 1.0 and m["mrr"] == 1.0
    data = Pairs(ids([1, 1, 2, 2]), ones, ids([1, 1, 2, 3]), ones, torch.tensor([0, 0, 1, 2]))
    # query 3 = (0,1) targets (0.8,0.6): scores 0, 1, 0.6 -> rank 2; the others rank 1
    m = RetrievalTask().evaluate(_Lookup(table), data, batch_size=3)
    assert m["recall@1"] == pytest.approx(3 / 4) and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((3 + 1 / 2) / 4)
    empty = RetrievalTask().evaluate(_Lookup(table), data.subset([]))
    assert all(math.isnan(v) for v in empty.values())


# --- data and config -----------------------------------------------------------------------------
def test_jsonl_pairs_source(tmp_path):
    rows = [{"q": f"question {i}", "p": f"passage {i % 5}", "org": f"o{i % 2}"} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="jsonl", path=str(path), text_column="q", passage_column="p", key_column="org")
    ds = load_dataset(cfg, 0)
    assert ds.texts[3] == "question 3" and ds.passages[3] == "passage 3" and ds.keys[3] == "o1"
    assert ds.label_names == ["o0", "o1"]  # owners double as labels (stratified global test)
    sub = ds.subset(np.array([7, 2]))
    assert sub.passages == ["passage 2", "passage 2"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"q": "x", "text": "y"}) + "\n")
    with pytest.raises(Exception, match="'p'"):
        load_dataset(DataConfig(source="jsonl", path=str(tmp_path / "bad.jsonl"), text_column="q", passage_column="p"), 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=retrieval"], "task=retrieval trains on \\(query, passage\\) pairs, which data.source=tweets"),
        (["data.source=foldoc"], "data.source=foldoc is a document collection .* set task=retrieval"),
        (["data.source=elements", "task=causal_lm"], "set task=retrieval"),
        (["data.source=jsonl", "data.path=x.jsonl", "data.passage_column=p"], "set task=retrieval"),
        (["task=retrieval", "data.source=elements", "data.owner_count=3"], "owner_count .* needs data.source=foldoc"),
        (["task=retrieval", "data.source=foldoc", "peft.method=prompt_tuning"], "none, lora or ia3"),
        (["task=retrieval", "data.source=foldoc", "dpsgd.enabled=true", "compare.methods=[federated]"], "per-example clipping"),
    ],
)
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, overrides)


def test_config_accepts_retrieval_sources():
    assert config_mod.load(None, ["task=retrieval", "data.source=foldoc", "data.owner_count=8"]).data.owner_count == 8
    cfg = config_mod.load(None, ["task=retrieval", "data.source=csv", "data.path=x.csv", "data.passage_column=p"])
    assert cfg.task == "retrieval"
    shipped = config_mod.load(Path(__file__).parents[1] / "configs" / "rag_retriever_foldoc.yaml")
    assert shipped.task == "retrieval" and shipped.data.source == "foldoc" and shipped.data.partition == "natural"


@pytest.mark.slow
def test_full_fine_tuning_trains_every_weight_but_the_unused_pooler():
    from fedfm.config import PeftSection
    from fedfm.models import Build, count_params, load_encoder_for_training, trainable_params

    model = load_encoder_for_training("minilm", Build(PeftSection(method="none"), 0))
    trainable, total = count_params(model)
    assert not any("pooler" in n for n in trainable_params(model))
    assert total - trainable == 384 * 384 + 384  # the pooler's dense layer: mean pooling never uses it


# --- end to end ----------------------------------------------------------------------------------
TINY = [
    "name=r",
    "seed=0",
    "task=retrieval",
    "rounds=2",
    "data.source=foldoc",
    "data.owner_count=2",
    "data.max_examples=200",
    "data.partition=natural",
    "data.max_length=32",
    "federation.num_clients=null",
    "train.local_steps=3",
    "train.batch_size=16",
    "train.lr=0.002",
    "eval.batch_size=64",
]


@pytest.mark.slow
@pytest.mark.skipif(not collection_path("foldoc").is_file(), reason="run `fedfm data fetch --corpus foldoc`")
def test_federated_retriever_improves_and_reloads_for_rag(tmp_path):
    cfg = config_mod.load(None, [*TINY, f"output_dir={tmp_path}"])
    app = App(cfg)
    assert sorted(app.split.client_names) == ["language", "networking", "other"]  # the 2 largest tags + the rest
    before = app.server_evaluate(app.initial_weights, full=True)
    run_dir = tmp_path / "r"
    summary = server.run_method(app, "federated", run_dir)
    after = summary["global"]
    assert after["loss"] < before["loss"] and after["mrr"] >= before["mrr"]
    # only the LoRA tensors travelled (query and value of 6 layers, A and B each)
    assert app.trainable_params == 6 * 2 * (8 * 384 + 384 * 8)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["recall@5"] is not None for r in records) and records[-1]["accuracy"] is None
    assert report.run_table(summary).columns[2].header == "Recall@1"

    # the final adapter is what fedfm.rag re-indexes with: it loads, merged, through rag's own loader
    from fedfm.models import set_weights
    from fedfm.rag.embed import encode_batch, load_encoder

    encoder, tokenizer = load_encoder(str(run_dir / "final"))
    batch = tokenizer(["What is Ethernet?", "A local-area network technology."], padding=True, return_tensors="pt")
    set_weights(app.model, RunDir(run_dir).load_checkpoint()[0][0].weights)  # the last round's global model
    app.model.eval()
    with torch.inference_mode():
        assert torch.allclose(encode_batch(encoder, batch), encode_batch(app.model, batch), atol=1e-5)
